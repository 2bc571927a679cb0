"""An induction head forming during a real training run, seen in the store and on the
dashboard: the 2-layer attention-only model of configs/induction.toml, trained on CPU on
the documents of `python -m trainer.synthetic` (random tokens repeated once, and
previous-token documents). Olsson et al. (2022)'s phase change, at a scale a test can
afford: about a minute."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, ahead, read_metrics, run_cli
from store.reader import RunStore
from trainer import checkpoint

pytestmark = pytest.mark.integration

APP = str(ROOT / "dashboard" / "app.py")
VOCAB = 32


@ahead("induction_run", data=False)
def _induction(_data, d: Path):
    """(d / "run", the synthetic data's process, the training's: None if there is no data)."""
    r = run_cli(["-m", "trainer.synthetic", "--out", str(d / "data"), "--vocab", str(VOCAB),
                 "--half", "20", "--min-half", "6", "--tokens", "1000000",
                 "--val-tokens", "16384"])
    if r.returncode != 0:
        return d / "run", r, None
    # The config as a user runs it; only the paths and the PNG plot differ.
    return d / "run", r, run_cli(["-m", "trainer", "--config",
                                  str(ROOT / "configs" / "induction.toml"), "--run-dir",
                                  str(d / "run"), "--data", str(d / "data"),
                                  "--log.plot=false"], timeout=900)


@pytest.fixture(scope="module")
def induction_run(runs_ahead) -> Path:
    """The run, trained ahead (helpers.ahead)."""
    run, data, r = runs_ahead.take("induction_run")
    assert data.returncode == 0, data.stderr
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def rs(induction_run) -> RunStore:
    return RunStore(induction_run / "capture.zarr")


def first_above(x: np.ndarray, threshold: float) -> int:
    return int(np.flatnonzero(x > threshold)[0])


def test_a_layer_1_head_becomes_an_induction_head(rs):
    steps, ind = rs.head_scores("induction")
    _, prev = rs.head_scores("prev_token")
    assert rs.n_layers == 2 and ind.shape == (len(steps), 2, rs.n_heads)
    # some layer-1 head: below 0.1 at a capture, above 0.5 at a later one
    formed = [(h, int(steps[i]), int(steps[j])) for h in range(rs.n_heads)
              for i in range(len(steps)) for j in range(i + 1, len(steps))
              if ind[i, 1, h] < 0.1 and ind[j, 1, h] > 0.5]
    assert formed, f"layer-1 induction scores by capture: {ind[:, 1].round(2).tolist()}"
    # ... and stays one to the end of the run: not one lucky capture
    assert ind[-1, 1].max() > 0.5
    # At step 0 nothing is: attention is near uniform.
    assert ind[0, 1].max() < 0.1
    # The circuit: by the time it forms, a layer-0 head attends to the previous token (the
    # head whose output the induction head's keys read), and had not at step 0.
    j = first_above(ind[:, 1].max(-1), 0.5)
    assert prev[j, 0].max() > 0.3 > prev[0, 0].max(), prev[:, 0].round(2).tolist()


def test_the_trained_model_copies_repeated_sequences_it_never_saw(induction_run):
    """What the score stands for, measured apart from the store: on fresh random tokens
    repeated once, the final checkpoint predicts the second copy and not the first."""
    model, _, _ = checkpoint.load_model(induction_run, checkpoint.latest_step(induction_run))
    g = torch.Generator().manual_seed(12345)
    first = torch.randint(0, VOCAB, (64, 15), generator=g)
    x = torch.cat([first, first], 1)
    with torch.no_grad():
        logp = model(x).float().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # nll[:, t] predicts x[:, t+1]
    first_half, second_half = nll[:, :14].mean().item(), nll[:, 15:].mean().item()
    assert first_half > 0.8 * math.log(VOCAB), first_half  # random: nothing to predict
    assert second_half < 0.3 * math.log(VOCAB), (first_half, second_half)
    # training's own record agrees: the loss fell
    m = read_metrics(induction_run)
    assert m[max(m)]["loss"] < m[min(m)]["loss"] - 0.3


def test_the_dynamics_page_marks_the_step_it_formed(monkeypatch, induction_run, rs):
    from streamlit.testing.v1 import AppTest

    steps, ind = rs.head_scores("induction")
    # The step the page must name, from the scores themselves: the first capture where a
    # head crosses 0.5 (none in layer 0: the varying lengths give a positional head
    # nothing to predict).
    j = first_above(ind.max((1, 2)), 0.5)
    layer, head = np.unravel_index(int(np.argmax(ind[j])), ind[j].shape)
    assert layer == 1
    monkeypatch.setattr(sys, "argv", ["app.py"])
    monkeypatch.setenv("DASHBOARD_RUN_DIR", str(induction_run))
    monkeypatch.delenv("DASHBOARD_RUNS_ROOT", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "dynamics"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    ok = " ".join(str(x.value) for x in at.success)
    assert f"Induction phase change at step **{int(steps[j])}**: layer 1 head {head}" in ok
    assert (f"(?page=attention&run={induction_run.name}&layer=1&head={head}"
            f"&step={int(steps[j])})") in ok
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    assert [sh["x0"] for sh in heat["shapes"]] == [j]  # the heatmap column of that step
    assert [(a["x"], a["text"]) for a in heat["annotations"]] == \
        [(j, f"phase change (step {int(steps[j])})")]


def test_prompt_across_snapshots_shows_the_second_copy_loss_fall_at_the_phase_change(
        induction_run, rs):
    """The Prompt page's across-training view of the repeated random-token prompt (the
    capture's own induction probe, as its button makes it): the second copy's loss falls
    most between the two snapshots around the step the Dynamics page marks."""
    from capture.prompt import induction_prompt, run_text
    from dashboard.dynamics import phase_change
    from dashboard.prompt import induction_setup

    pc = phase_change(rs)
    assert pc is not None
    vocab, half, seed = induction_setup(rs)
    r = run_text(induction_run, induction_prompt(vocab, half, seed), steps="all")
    steps = r.steps.tolist()
    assert len(steps) >= 10 and steps[-1] == 1500, steps
    second = r.loss[:, half:].mean(1)  # loss[:, t] predicts token t + 1: the second copy
    first = r.loss[:, :half - 1].mean(1)
    k = int(np.argmax(-np.diff(second)))  # the largest fall: snapshots k -> k + 1
    assert steps[k] < pc["step"] and steps[k + 1] >= pc["before"], \
        (pc, dict(zip(steps, second.round(2).tolist())))
    # ... and it is the induction head's: the first copy (unpredictable) does not fall
    assert second[-1] < 0.5 * second[0] and first[-1] > 0.8 * first[0], (first, second)

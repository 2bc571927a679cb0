"""The open-ended schedule: a resumed run may change max_steps, the capture cadence or the
world size and keeps appending to the same store, with the same losses as an uninterrupted
run and the same activations at the steps both captured. And a kill -9 in the middle of a
weight snapshot leaves only whole snapshots visible."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (CAP3, ahead, losses, ok, popen, run_cli, run_clis, torchrun, train_args,
                     wait_for)
from store.reader import RunStore
from trainer import checkpoint

pytestmark = pytest.mark.integration

# 16-token probe, statistics and activations every 3 steps, snapshots every 3: the captures
# of conftest.py's uninterrupted 12-step runs, which the resumed runs here must equal.
CAP = CAP3


def _args(data: Path, run: Path, steps: int, *extra: str, ranks: int = 1) -> list[str]:
    args = train_args(data, run, *CAP, *extra, steps=steps)
    return torchrun(ranks) + args[1:] if ranks > 1 else args


def _train(data: Path, run: Path, steps: int, *extra: str, ranks: int = 1):
    return ok(run_cli(_args(data, run, steps, *extra, ranks=ranks)))


@ahead("first_legs")
def _first_legs(data: Path, base: Path) -> dict:
    legs = {"one5": (5, 1), "two6": (6, 2)}
    results = run_clis(*(_args(data, base / k, n, ranks=w) for k, (n, w) in legs.items()))
    return {k: (base / k, r) for k, r in zip(legs, results)}


@pytest.fixture(scope="module")
def first_legs(runs_ahead, shakespeare_data) -> dict[str, Path]:
    """The first legs the tests resume, trained side by side (and ahead: helpers.ahead):
    "one5", one process to step 5 (its last step off the capture cadence); "two6", two FSDP
    ranks to step 6. Each test resumes a copy of its own."""
    legs = runs_ahead.take("first_legs")
    for _, r in legs.values():
        ok(r)
    return {k: leg for k, (leg, _) in legs.items()}


def _copy(leg: Path, run: Path) -> Path:
    shutil.copytree(leg, run)
    return run


def _store(run: Path) -> RunStore:
    return RunStore(str(run / "capture.zarr"))


def _same_captures(a: RunStore, b: RunStore, steps, exact: bool = True) -> None:
    for step in steps:
        for hook in a.act_hooks:
            x, y = a.activations(hook, int(step)), b.activations(hook, int(step))
            if exact:
                assert np.array_equal(x, y, equal_nan=True), (hook, step)
            else:
                np.testing.assert_allclose(x, y, atol=5e-3, rtol=5e-3, err_msg=f"{hook} {step}")
        for hook in a.hooks:
            sa, sb = a.stats_at(hook, int(step)), b.stats_at(hook, int(step))
            for k in sa:
                if exact:
                    assert np.array_equal(sa[k], sb[k]), (hook, k, step)
                else:
                    np.testing.assert_allclose(sa[k], sb[k], atol=5e-3, rtol=5e-3)
        np.testing.assert_allclose(a.token_loss(int(step)), b.token_loss(int(step)),
                                   rtol=0 if exact else 1e-3, atol=0 if exact else 1e-3)


def test_resume_with_more_steps_appends_to_the_same_store(shakespeare_data, uninterrupted,
                                                          first_legs, tmp_path):
    run = _copy(first_legs["one5"], tmp_path / "run")  # 5 steps
    r = _train(shakespeare_data, run, 12, "--resume")
    assert "resumed from step 5" in r.stdout
    ref = uninterrupted["one"]
    assert losses(run) == losses(ref)  # exactly
    a, b = _store(run), _store(ref)
    # the first run's final step (5) stays as an extra capture
    assert list(a.steps()) == [0, 1, 2, 3, 5, 6, 9, 12]
    assert list(b.steps()) == [0, 1, 2, 3, 6, 9, 12]
    _same_captures(a, b, b.steps())
    assert a.snapshot_steps() == [0, 1, 2, 3, 5, 6, 9, 12]
    assert a.max_steps == 12 and list(a.metrics()["step"]) == list(range(1, 13))


def test_resume_with_another_cadence(shakespeare_data, uninterrupted, first_legs, tmp_path):
    run = _copy(first_legs["one5"], tmp_path / "run")  # 5 steps
    r = _train(shakespeare_data, run, 12, "--resume", "--capture.every=4",
               "--capture.full_every=4", "--capture.snapshot_every=0")
    assert "resumed from step 5" in r.stdout
    ref = uninterrupted["one"]
    assert losses(run) == losses(ref)
    a, b = _store(run), _store(ref)
    # every 3 up to 5 and the first leg's last step, then every 4
    assert list(a.steps()) == [0, 1, 2, 3, 5, 8, 12]
    shared = sorted(set(a.steps()) & set(b.steps()))
    assert shared == [0, 1, 2, 3, 12]
    _same_captures(a, b, shared)
    assert a.snapshot_steps() == [0, 1, 2, 3, 5]  # snapshots off after the resume


def test_resume_on_another_world_size(shakespeare_data, uninterrupted, first_legs, tmp_path):
    """Two FSDP ranks to step 6, then one process to 12: the global batch is the same, so
    the training is; the first leg's captures equal the uninterrupted 2-rank run's bit for
    bit, the second leg's agree to float tolerance (one process sums in another order)."""
    run = _copy(first_legs["two6"], tmp_path / "run")
    r = _train(shakespeare_data, run, 12, "--resume")
    assert "resumed from step 6" in r.stdout
    ref = uninterrupted["two"]
    got, want = losses(run), losses(ref)
    assert got[:6] == want[:6]
    assert got[6:] == pytest.approx(want[6:], rel=0, abs=2e-4)
    a, b = _store(run), _store(ref)
    assert list(a.steps()) == list(b.steps()) == [0, 1, 2, 3, 6, 9, 12]
    assert a.world == 1
    _same_captures(a, b, [0, 1, 2, 3, 6])
    _same_captures(a, b, [9, 12], exact=False)


def _torn_snapshot(store_dir: Path) -> int | None:
    """A snapshot being written: a step folder with files (or a temporary file) but no
    marker."""
    root = store_dir / "snapshots"
    if not root.is_dir():
        return None
    for d in root.iterdir():
        if any(d.iterdir()) and not (d / "snapshot.json").exists():
            return int(d.name)
    return None


def test_kill9_during_a_snapshot_hides_it_and_resume_rewrites_it(shakespeare_data, tmp_path):
    # A wider model (its snapshot is about 30 MB) and a snapshot every step: the kill lands
    # while one is being written.
    wide = ["--model.n_embd=256", "--model.n_head=4", "--model.block_size=32",
            "--capture.snapshot_every=1", "--capture.every=5", "--capture.full_every=0",
            "--checkpoint.every=2"]
    run = tmp_path / "run"
    store_dir = run / "capture.zarr"
    p = popen(train_args(shakespeare_data, run, *wide, steps=10))
    wait_for(lambda: checkpoint.latest_step(run) is not None
             and _torn_snapshot(store_dir) is not None, p, timeout=600)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    torn = _torn_snapshot(store_dir)
    assert torn is not None, "the kill did not land inside a snapshot"
    from safetensors.torch import load as st_load  # bf16: numpy has no such dtype
    rs = RunStore(str(store_dir))
    visible = rs.snapshot_steps()
    assert torn not in visible and visible == list(range(len(visible)))
    for s in visible:  # every visible snapshot is whole
        assert len(st_load(rs.snapshot_file(s))) > 0
    last = checkpoint.latest_step(run)
    r = ok(run_cli(train_args(shakespeare_data, run, *wide, "--resume", steps=10)))
    assert f"resumed from step {last}" in r.stdout
    rs = RunStore(str(store_dir))
    assert rs.snapshot_steps() == list(range(11))
    # the final snapshot is the final checkpoint's weights, in bf16
    snap = st_load(rs.snapshot_file(10))
    model, _, _ = checkpoint.load_model(run, 10)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte.weight, stored once
        assert torch.equal(snap[name], t.to(torch.bfloat16)), name


def test_an_incompatible_resume_is_refused_in_one_line_before_writing(shakespeare_data,
                                                                      first_legs, tmp_path):
    run = _copy(first_legs["one5"], tmp_path / "run")  # 5 steps
    config = (run / "config.toml").read_text()
    cases = ((["--capture.hooks=blocks.0.hook_resid_post"], "act_hooks"),
             (["--capture.probe_seed=7"], "another probe set"),
             (["--capture.attn_len=8"], "attn_len"))
    # the three attempts side by side: each must be refused before it writes anything
    results = run_clis(*(train_args(shakespeare_data, run, *CAP, *extra, "--resume", steps=6)
                         for extra, _ in cases))
    for (_, words), r in zip(cases, results):
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: store ") and words in lines[0], \
            r.stderr
    assert (run / "config.toml").read_text() == config  # nothing written
    assert list(_store(run).steps()) == [0, 1, 2, 3, 5]

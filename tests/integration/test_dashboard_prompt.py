"""The dashboard's Prompt page (dashboard/prompt.py) in Streamlit's AppTest on the session's
tiny_run (tests/helpers.py TINY_ARGS: 3 layers, 2 heads, block_size 32; weight snapshots at
0, 1, 2, 3, 6, 8, a checkpoint at 8): every number it shows is capture.prompt.run_text's
for that text and step; the across-training view has one column per snapshot; the
induction prompt's scores are capture.dynamics.induction_score's; links open it at a
neuron, head and step; bad input gives a sentence, never a traceback; the other pages
still never import torch."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import BPE, ROOT, TINY_SNAPSHOTS, env
from apptest_env import arr, open_app
from apptest_env import charts_by_title as charts
from store.reader import RunStore
from store_fixture import write_store

pytestmark = pytest.mark.integration

APP = str(ROOT / "dashboard" / "app.py")
TEXT = "ROMEO: But soft, what light through yonder window breaks?"
HOOK = "blocks.1.mlp.hook_post"
STEP, NEURON, LAYER, HEAD, POS = 6, 5, 2, 1, 3


def app(monkeypatch, run, **params):
    return open_app(monkeypatch, run_dir=run, timeout=120, **params)


def texts(at) -> str:
    return " ".join(str(e.value) for kind in ("info", "warning", "error")
                    for e in getattr(at, kind))


def titles_of(markup: str) -> list[str]:
    """The title (hover text) of each token span, unescaped."""
    return [html.unescape(a or b)
            for a, b in re.findall(r"""title=(?:"([^"]*)"|'([^']*)')""", markup)]


@pytest.fixture(scope="module")
def decode():
    from dashboard.data import make_decoder
    return make_decoder(str(BPE))


def test_the_page_shows_what_run_text_gives(monkeypatch, tiny_run, decode):
    from capture.dynamics import induction_score
    from capture.prompt import induction_prompt, run_text

    import torch

    at = app(monkeypatch, tiny_run, page="prompt")
    assert at.header[0].value == "Prompt" and not at.error
    # the run's snapshot steps on the slider; across training on (6 snapshots)
    assert at.select_slider(key="prompt_step").options == [str(s) for s in TINY_SNAPSHOTS]
    assert at.toggle(key="prompt_across").value is True
    at.text_area(key="prompt_text").set_value(TEXT).run()
    at.select_slider(key="prompt_step").set_value(STEP).run()
    at.selectbox(key="prompt_hook").set_value(HOOK).run()
    at.number_input(key="prompt_neuron").set_value(NEURON).run()
    at.selectbox(key="prompt_layer").set_value(LAYER).run()
    at.selectbox(key="prompt_head").set_value(HEAD).run()
    at.selectbox(key="prompt_pos").set_value(POS).run()
    assert not at.exception and not texts(at), texts(at)

    pat = f"blocks.{LAYER}.attn.hook_pattern"
    r = run_text(tiny_run, TEXT, steps="all", hooks=[HOOK, pat], top_k=5, lens=True)
    assert r.steps.tolist() == TINY_SNAPSHOTS
    si, T = r.index(STEP), len(r.tokens)
    assert f"{T} tokens of at most 32." in [c.value for c in at.caption]

    # the tokens coloured by loss: each one's loss, and the top-5 next tokens on hover
    loss_md, acts_md = at.markdown[0].value, at.markdown[1].value
    tips = titles_of(loss_md)
    assert len(tips) == T
    assert "loss: none (the first token)" in tips[0]
    for j in range(1, T):
        assert f"loss {r.loss[si, j - 1]:.3f} " in tips[j], (j, tips[j])
    for j in range(T):
        want = "; ".join(f"{decode(int(i))!r} {p:.3g}"
                         for i, p in zip(r.top.ids[si, j], r.top.probs[si, j]))
        assert tips[j].endswith(f"next: {want}"), (j, tips[j])
    # the neuron's activation on each token, coloured as the Neurons page colours
    assert [h.value for h in at.subheader][:2] == ["Loss on each token",
                                                   f"Neuron {NEURON} of {HOOK}"]
    assert titles_of(acts_md) == [f"{a:.3f}" for a in r[HOOK][si, :, NEURON]]
    assert "class='tok'" in acts_md and "rgba(" in acts_md
    # the head's attention: the interactive view carries the pattern, the heatmap shows it
    frame = at.get("iframe")[0].proto.srcdoc
    assert json.dumps(r.token_strs) in frame
    assert json.dumps(np.round(r[pat][si, HEAD].astype(np.float64), 4).tolist()) in frame
    c = charts(at)
    heat = c[f"Layer {LAYER}, head {HEAD}, step {STEP}"]["data"][0]
    np.testing.assert_allclose(arr(heat["z"]), r[pat][si, HEAD], atol=1e-6)
    labels = [f"{i}:{t!r}"[:18] for i, t in enumerate(r.token_strs)]
    assert heat["x"] == heat["y"] == labels
    # the logit lens at position POS: run_text's lens loss; the last block's top prediction
    # is the model's own
    lens = at.dataframe[0].value
    np.testing.assert_allclose(lens["loss"].to_numpy(), r.lens[si, :, POS], rtol=1e-6)
    assert lens["top prediction"].iloc[-1] == repr(decode(int(r.top.ids[si, POS, 0])))
    np.testing.assert_allclose(lens["p"].iloc[-1], r.top.probs[si, POS, 0], rtol=1e-4)

    # across training: one column per snapshot step
    xs = [str(s) for s in TINY_SNAPSHOTS]
    loss = c["Per-token loss by step"]["data"][0]
    assert loss["x"] == xs and loss["y"] == labels[1:]
    np.testing.assert_allclose(arr(loss["z"]), r.loss.T, rtol=1e-6)
    neu = c[f"Neuron {NEURON} of {HOOK} on this text by step"]["data"][0]
    assert neu["x"] == xs
    np.testing.assert_allclose(arr(neu["z"]), r[HOOK][:, :, NEURON].T, rtol=1e-6, atol=1e-7)
    anim = c[f"Layer {LAYER}, head {HEAD} by step (slide the step)"]
    assert [f["name"] for f in anim["frames"]] == xs
    assert [s["label"] for s in anim["layout"]["sliders"][0]["steps"]] == xs
    for i, f in enumerate(anim["frames"]):
        np.testing.assert_allclose(arr(f["data"][0]["z"]), r[pat][i, HEAD], atol=1e-6)

    # the repeated random-token prompt: the capture's own induction probe, its scores
    # capture.dynamics's, and the button puts it in the text box
    rs = RunStore(tiny_run / "capture.zarr")
    rep = rs.repeated_tokens()[0]
    half = len(rep) // 2
    ids = induction_prompt(rs.attrs["model"]["vocab_size"], half,
                           rs.attrs["run"]["capture"]["probe_seed"] + 1)
    assert ids.tolist() == rep.tolist()
    ri = run_text(tiny_run, ids, steps="all", hooks=["blocks.*.attn.hook_pattern"], top_k=0)
    ind = c["Induction score and loss on the repeated prompt by step"]["data"]
    by = {d["name"]: d for d in ind}
    for layer in range(3):
        want = [induction_score(torch.from_numpy(ri[f"blocks.{layer}.attn.hook_pattern"]
                                                 [i:i + 1]), half).max().item()
                for i in range(len(TINY_SNAPSHOTS))]
        assert arr(by[f"layer {layer} (best head)"]["x"]).tolist() == TINY_SNAPSHOTS
        np.testing.assert_allclose(arr(by[f"layer {layer} (best head)"]["y"]), want, atol=1e-6)
    np.testing.assert_allclose(arr(by["second-copy loss"]["y"]), ri.loss[:, half:].mean(1),
                               rtol=1e-6)
    np.testing.assert_allclose(arr(by["first-copy loss"]["y"]), ri.loss[:, :half - 1].mean(1),
                               rtol=1e-6)
    at.button(key="prompt_induction").click().run()
    assert not at.exception and not texts(at), texts(at)
    assert at.text_area(key="prompt_text").value == "ids: " + ", ".join(map(str, ids))
    loss = charts(at)["Per-token loss by step"]["data"][0]
    np.testing.assert_allclose(arr(loss["z"]), ri.loss.T, rtol=1e-6)
    assert f"{2 * half} tokens of at most 32." in [c.value for c in at.caption]


def test_one_step_only_and_bad_input_give_a_sentence(monkeypatch, tiny_run):
    at = app(monkeypatch, tiny_run, page="prompt")
    at.toggle(key="prompt_across").set_value(False).run()
    at.text_area(key="prompt_text").set_value("ROMEO:").run()
    assert not at.exception and not texts(at)
    assert "Per-token loss by step" not in charts(at)
    assert any("Across training (off)" in c.value for c in at.caption)
    cases = [("", "info", "Type a text in the box"),
             ("   \n", "info", "Type a text in the box"),
             (TEXT * 3, "warning", "more than this model's context of 32 tokens"),
             ("ids: 1, x", "warning", "After 'ids:' give token ids as integers"),
             ("ids: 99999999", "warning", "outside this model's vocabulary")]
    for text, kind, words in cases:
        at.text_area(key="prompt_text").set_value(text).run()
        assert not at.exception, (text, [e.value for e in at.exception])
        shown = [str(e.value) for e in getattr(at, kind)]
        assert len(shown) == 1 and words in shown[0], (text, texts(at))
        assert not at.error and not at.get("plotly_chart"), text


def test_a_run_without_snapshots_or_run_folder(monkeypatch, tiny_run, tmp_path):
    run = write_store(tmp_path / "nosnap", [0, 10], full=[0])
    assert RunStore(run / "capture.zarr").snapshot_steps() == []
    at = app(monkeypatch, run, page="prompt")
    assert "This run has no weight snapshots" in texts(at) and not at.error
    assert len(at.info) == 1 and not at.get("plotly_chart")
    # a store on its own, without the run's config.toml: a sentence too
    alone = tmp_path / "alone"
    shutil.copytree(tiny_run / "capture.zarr", alone / "capture.zarr")
    at = app(monkeypatch, alone, page="prompt")
    assert "Running text needs the run's folder" in texts(at) and not at.error


def test_links_open_the_prompt_page(monkeypatch, tiny_run):
    # a step without a snapshot (4) opens the nearest snapshot step (3) and says so
    at = app(monkeypatch, tiny_run, page="prompt", hook=HOOK, neuron="9", layer="2",
             head="1", step="4")
    assert (at.selectbox(key="prompt_hook").value, at.number_input(key="prompt_neuron").value,
            at.selectbox(key="prompt_layer").value, at.selectbox(key="prompt_head").value,
            at.select_slider(key="prompt_step").value) == (HOOK, 9, 2, 1, 3)
    assert "Step 4 has no weight snapshot: showing step 3" in texts(at)
    # what the store does not have is ignored, not an error
    at = app(monkeypatch, tiny_run, page="prompt", hook="nope", neuron="x", layer="99",
             step="6")
    assert not at.error and at.select_slider(key="prompt_step").value == 6
    # the other pages link here
    at = app(monkeypatch, tiny_run, page="neurons", hook=HOOK, neuron="9", step="8")
    assert f"(?page=prompt&run=tiny&hook={HOOK}&neuron=9&step=8)" in " ".join(
        c.value for c in at.caption)
    at = app(monkeypatch, tiny_run, page="attention", layer="2", head="1", step="8")
    assert "(?page=prompt&run=tiny&layer=2&head=1&step=8)" in " ".join(c.value for c in at.caption)
    at = app(monkeypatch, tiny_run, page="dynamics")
    assert "(?page=prompt&run=tiny&hook=blocks.0.mlp.hook_post&neuron=0&step=8)" in " ".join(
        m.value for m in at.markdown)


def test_only_the_prompt_page_imports_torch(tiny_run, tmp_path):
    """Every other page, run in a fresh interpreter: torch, trainer and capture stay out."""
    code = f"""
import sys
from streamlit.testing.v1 import AppTest
import dashboard.prompt
for page in ("training", "dynamics", "neurons", "attention", "store"):
    at = AppTest.from_file({APP!r}, default_timeout=60)
    at.query_params["page"] = page
    at.run()
    assert not at.exception and not at.error, (page, [e.value for e in at.exception])
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'capture')]
assert not bad, bad[:5]
"""
    e = env(DASHBOARD_RUN_DIR=str(tiny_run))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]

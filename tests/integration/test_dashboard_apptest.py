"""The dashboard in Streamlit's AppTest on the store of a real tiny training run (schema 2:
summary captures at 0, 1, 2, 4, 6, 8, full ones at 0, 1, 2, 4, 8, weight snapshots at 0, 1,
2, 3, 6, 8) and on small stores written through StoreWriter: each page shows the store's
own numbers, the parts that need activations or attention offer full captures only, and
every bad store (no full capture yet included) gives a sentence, never a traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import BPE, TINY_FULL, TINY_SNAPSHOTS, TINY_STEPS
from apptest_env import APP, arr, charts, open_app
from store.reader import RunStore
from store.writer import StoreWriter

from store_fixture import ACT_HOOK, write_store  # noqa: E402

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def rs(tiny_run) -> RunStore:
    r = RunStore(tiny_run / "capture.zarr")
    assert r.schema_version == 2
    assert r.steps().tolist() == TINY_STEPS and r.steps("full").tolist() == TINY_FULL
    assert r.snapshot_steps() == TINY_SNAPSHOTS
    assert (r.attn_len, r.seq_len) == (8, 16) and r.has_token_loss
    return r


def app(monkeypatch, page: str | None = None, run_dir=None, runs_root=None):
    return open_app(monkeypatch, run_dir=run_dir, runs_root=runs_root,
                    **({"page": page} if page else {}))


def app_with_params(monkeypatch, run, **params):
    """The app on `run`, opened at a link's query parameters."""
    return open_app(monkeypatch, run_dir=run, **params)


def titles(at) -> list[str]:
    return [(c["layout"].get("title") or {}).get("text", "") for c in charts(at)]


def texts(at) -> str:
    return " ".join(str(e.value) for kind in ("info", "warning", "error")
                    for e in getattr(at, kind))


# ----------------------------------------------------------------------------- pages


def test_training_page(monkeypatch, tiny_run, rs):
    at = app(monkeypatch, "training", run_dir=tiny_run)
    tr, va = rs.metrics("train"), rs.metrics("val")
    m = {x.label: x.value for x in at.metric}
    assert m["Step"] == str(int(tr["step"][-1])) == "8"
    assert m["Train loss"] == f"{tr['loss'][-1]:.4f}"
    assert m["Val loss"] == f"{va['loss'][-1]:.4f}"
    assert m["Captures"] == "6"
    assert {x.label: x.delta for x in at.metric}["Captures"] == "5 full · 6 snapshots"
    assert m["Status"] == "finished"
    assert titles(at) == ["Loss", "Validation loss", "Learning rate", "Gradient norm",
                          "Tokens per second"]
    loss = charts(at)[0]["data"]
    by = {d["name"]: d for d in loss}
    assert np.allclose(arr(by["tiny"]["y"]), tr["loss"], rtol=1e-6)
    # captured steps marked on the loss curve, full and summary-only apart
    assert arr(by["full capture"]["x"]).tolist() == TINY_FULL
    assert arr(by["summary capture"]["x"]).tolist() == [6]
    cap = " ".join(c.value for c in at.caption)
    assert "Captured steps: 0, 1, 2, 4, 6, 8." in cap
    assert "(activations, attention, logit effects): 0, 1, 2, 4, 8." in cap
    assert "Weight snapshots: 0, 1, 2, 3, 6, 8." in cap
    # the sidebar's run picker: the run, its shape, status and captures
    side = " ".join(at.sidebar.radio(key="run").proto.captions)
    assert "finished" in side and "3 layers x 32" in side
    assert "captures 6 (5 full) · 6 snapshots · 8 steps planned" in side
    at.checkbox(key="logx").check().run()
    assert all(c["layout"]["xaxis"]["type"] == "log" for c in charts(at))


def test_neurons_page(monkeypatch, tiny_run, rs):
    at = app(monkeypatch, "neurons", run_dir=tiny_run)
    hook = at.selectbox(key="hook").value
    assert hook == "blocks.0.mlp.hook_post"  # it opens on the first MLP hook's neurons
    D = rs.hooks[hook]
    steps = [int(s) for s in rs.steps()]
    assert at.dataframe[0].value.shape == (D, 5)
    stats = rs.stats_at(hook, steps[-1])
    assert np.allclose(at.dataframe[0].value["max"].to_numpy(), stats["max"])
    assert f"mean of the {D} neurons of {hook} at step {steps[-1]}" in titles(at)
    # statistics of every hook, the summary-only step 6 included
    assert at.selectbox(key="hook").options == [
        h if h in rs.act_hooks else f"{h} (statistics only)" for h in rs.hooks]
    assert at.select_slider(key="neuron_step").options == [str(s) for s in TINY_STEPS]
    # another step, an MLP hook whose activations full captures keep, a chosen neuron
    at.select_slider(key="neuron_step").set_value(steps[2]).run()
    mlp = "blocks.1.mlp.hook_post"
    assert mlp in rs.act_hooks
    at.selectbox(key="hook").set_value(mlp).run()
    at.number_input(key="neuron").set_value(5).run()
    assert not at.exception
    t = titles(at)
    assert f"mean of the {rs.hooks[mlp]} neurons of {mlp} at step {steps[2]}" in t
    assert "Neuron 5 across training" in t and "Top activation of neuron 5 across steps" in t
    assert at.dataframe[0].value.shape == (rs.hooks[mlp], 5)
    hist = next(c for c in charts(at) if c["layout"]["title"]["text"] == "Neuron 5 across training")
    _, mx = rs.stat(mlp, "max", 5)
    assert np.allclose(arr(next(d for d in hist["data"] if d["name"] == "max")["y"]), mx)
    heat = next(c for c in charts(at) if "by step" in c["layout"]["title"]["text"])
    assert arr(heat["data"][0]["z"]).shape == (64, len(steps))
    heads = [h.value for h in at.subheader]
    assert heads[0] == f"Neuron 5 of {mlp} at step {steps[2]}"
    assert f"Top-activating tokens of neuron 5 at step {steps[2]}" in heads
    html = next(m.value for m in at.markdown if "toprow" in m.value)
    vals, seqs, poss = rs.topk(mlp, steps[2], 5)
    assert f"<b>{vals[0]:.3f}</b>" in html and f"seq {seqs[0]}, pos {poss[0]}" in html
    # the top token decoded with the run's own GPT-2 BPE
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    enc = tiktoken.Encoding("t", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(str(BPE)),
                            special_tokens={"<|endoftext|>": 50256})
    tok = enc.decode([int(rs.probe_tokens()[seqs[0], poss[0]])])
    import html as h
    assert h.escape(tok).replace(" ", "&nbsp;").replace("\n", "⏎") in html
    # step 2 is a full capture: every context token is coloured from the activations
    a = rs.activations(mlp, steps[2], int(seqs[0]))[:, 5].astype(np.float32)
    ctx = a[max(0, int(poss[0]) - 8):int(poss[0]) + 3]
    assert "title='not stored'" not in html.split("</div>")[0]
    assert all(f"title='{x:.3f}'" in html for x in ctx)
    assert "Only each top token is coloured" not in " ".join(c.value for c in at.caption)
    # step 6 is a summary capture: the top-k is there, the context's activations are not
    at.select_slider(key="neuron_step").set_value(6).run()
    assert not at.exception
    assert "Top-activating tokens of neuron 5 at step 6" in [h.value for h in at.subheader]
    vals6, seqs6, poss6 = rs.topk(mlp, 6, 5)
    html = next(m.value for m in at.markdown if "toprow" in m.value)
    assert f"<b>{vals6[0]:.3f}</b>" in html and "title='not stored'" in html
    assert ("Only each top token is coloured: step 6 is a summary capture; activations are "
            "kept at full captures (nearest: step 8)." in " ".join(c.value for c in at.caption))
    # a hook with statistics only says so
    stat_only = next(x for x in rs.hooks if x not in rs.act_hooks)
    at.selectbox(key="hook").set_value(stat_only).run()
    assert not at.exception
    assert f"{stat_only} keeps statistics and top-k only" in " ".join(c.value for c in at.caption)


def test_attention_page(monkeypatch, tiny_run, rs):
    at = app(monkeypatch, "attention", run_dir=tiny_run)
    steps = [int(s) for s in rs.steps("full")]
    # the step slider offers the full captures only (step 6 holds no attention)
    slider = at.select_slider(key="attn_step")
    assert slider.options == [str(s) for s in TINY_FULL] and slider.value == 8
    assert slider.label == "Step (full captures)"
    assert "The first 8 of 16 query and key positions" in " ".join(c.value for c in at.caption)
    at.selectbox(key="attn_layer").set_value(1).run()
    at.selectbox(key="attn_head").set_value(1).run()
    at.selectbox(key="attn_seq").set_value(2).run()
    at.select_slider(key="attn_step").set_value(steps[3]).run()
    assert titles(at) == [f"Layer 1, head 1, step {steps[3]}, sequence 2",
                          f"All {rs.n_heads} heads of layer 1 at step {steps[3]}"]
    c = charts(at)
    want = rs.attention(1, steps[3], 2, 1).astype(np.float32)
    assert want.shape == (rs.attn_len, rs.attn_len) == (8, 8)
    assert np.allclose(arr(c[0]["data"][0]["z"]), want, atol=1e-6)
    # token labels: the first attn_len positions only
    from dashboard.data import make_decoder
    dec = make_decoder(str(BPE))
    want_labels = [f"{i}:{dec(t)!r}"[:18] for i, t in enumerate(rs.probe_tokens()[2][:8])]
    assert c[0]["data"][0]["x"] == c[0]["data"][0]["y"] == want_labels
    assert len(c[1]["data"]) == rs.n_heads


def test_store_page(monkeypatch, tiny_run, rs):
    at = app(monkeypatch, "store", run_dir=tiny_run)
    df = at.dataframe[1].value
    arrays = rs.arrays()
    assert list(df["path"]) == [a["path"] for a in arrays]
    assert (df["bytes on disk"] > 0).all()
    head = at.markdown[0].value
    assert "schema version 2" in head and "6 captures committed (5 full)" in head
    assert "6 weight snapshots" in head and "first 8 positions" in head
    # each committed step's tiers, and the snapshot steps (3: a snapshot, no capture)
    caps = at.dataframe[0].value
    assert caps["step"].tolist() == [0, 1, 2, 3, 4, 6, 8]
    assert caps["tiers"].tolist() == ["summary, full"] * 3 + ["", "summary, full", "summary",
                                                              "summary, full"]
    assert caps["snapshot"].tolist() == [True, True, True, True, False, True, True]
    tiers = rs.tiers()
    assert {int(s): t.split(", ") for s, t in zip(caps["step"], caps["tiers"]) if t} == tiers
    at.selectbox(key="array").set_value("attn/0").run()
    axes = at.markdown[-1].value
    assert "axis 0 (capture)" in axes and "axis 4 (kpos)" in axes


# ----------------------------------------------------------------------------- states


def test_dynamics_page(monkeypatch, tiny_run, rs):
    at = app(monkeypatch, "dynamics", run_dir=tiny_run)
    steps = rs.steps()
    c = charts(at)
    by_title = {(x["layout"].get("title") or {}).get("text", ""): x for x in c}
    # heads x steps heatmap of the induction score (the default), values from the store
    heat = by_title["induction of every head by step"]["data"][0]
    _, ind = rs.head_scores("induction")
    L, H = ind.shape[1:]
    assert heat["y"] == [f"L{layer} H{h}" for layer in range(L) for h in range(H)]
    assert heat["x"] == [str(s) for s in steps]
    np.testing.assert_allclose(arr(heat["z"]).reshape(L * H, -1),
                               ind.reshape(len(steps), -1).T, rtol=1e-6)
    best = by_title["Highest induction in each layer"]["data"]
    np.testing.assert_allclose(arr(best[1]["y"]), ind[:, 1].max(-1), rtol=1e-6)
    # the logit lens, one line per block
    lens_steps, lens = rs.logit_lens()
    lines = by_title["Probe loss read off each block's output (final LayerNorm + "
                     "unembedding)"]["data"]
    assert [t["name"] for t in lines] == [f"after block {i}" for i in range(L)]
    np.testing.assert_allclose(arr(lines[2]["y"]), lens[:, 2], rtol=1e-6)
    # the in-context-learning score, from the store's per-token loss
    icl_steps, icl = rs.icl()
    line = by_title["In-context-learning score by step"]["data"]
    assert len(line) == 1 and arr(line[0]["x"]).tolist() == icl_steps.tolist() == TINY_STEPS
    np.testing.assert_allclose(arr(line[0]["y"]), icl, rtol=1e-6)
    # births and deaths of the captured MLP hook
    hook = at.selectbox(key="dyn_hook").value
    ev = rs.neuron_events(hook)
    ev_chart = by_title[f"Births and deaths of {hook}'s neurons by step"]["data"]
    assert arr(ev_chart[0]["y"]).tolist() == ev.births.tolist()
    # no phase change in 8 steps of tiny shakespeare: said, not invented
    assert "No induction phase change yet" in texts(at)
    # another score, and the top heads linking into the Attention page
    at.radio(key="dyn_score").set_value("prev_token").run()
    _, prev = rs.head_scores("prev_token")
    heat = {(x["layout"].get("title") or {}).get("text", ""): x
            for x in charts(at)}["prev_token of every head by step"]["data"][0]
    np.testing.assert_allclose(arr(heat["z"]).reshape(L * H, -1),
                               prev.reshape(len(steps), -1).T, rtol=1e-6)
    md = " ".join(m.value for m in at.markdown)
    top = int(np.argmax(prev[-1].reshape(-1)))
    assert (f"(?page=attention&run=tiny&layer={top // H}&head={top % H}&step={int(steps[-1])})"
            in md)
    # a neuron's logit effects (full captures only): the table is the store's, decoded
    dla = at.select_slider(key="dyn_dla_step")
    assert dla.options == [str(s) for s in TINY_FULL] and dla.value == 8
    table = at.dataframe[0].value  # the only table on the page
    d = rs.neuron_logits(0, int(steps[-1]), 0)
    np.testing.assert_allclose(table["effect +"].to_numpy(), np.round(d["top_value"], 4))
    assert len(table) == rs.dla_k


def test_links_open_attention_and_neurons_at_a_head_neuron_and_step(monkeypatch, tiny_run,
                                                                     rs):
    steps = [int(s) for s in rs.steps()]
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("DASHBOARD_RUN_DIR", str(tiny_run))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(page="attention", layer="2", head="1", step=str(steps[1]))
    at.run()
    assert not at.exception
    assert (at.selectbox(key="attn_layer").value, at.selectbox(key="attn_head").value) == (2, 1)
    assert at.select_slider(key="attn_step").value == steps[1]
    assert titles(at)[0] == f"Layer 2, head 1, step {steps[1]}, sequence 0"
    # a link to a summary capture opens the nearest full capture, and says so
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(page="attention", layer="1", head="0", step="6")
    at.run()
    assert not at.exception
    assert at.select_slider(key="attn_step").value == 8
    assert "Step 6 is a summary capture (no attention patterns): showing step 8" in texts(at)
    assert titles(at)[0] == "Layer 1, head 0, step 8, sequence 0"
    at = AppTest.from_file(APP, default_timeout=60)
    hook = "blocks.1.mlp.hook_post"
    at.query_params.update(page="neurons", hook=hook, neuron="9", step="6")
    at.run()
    assert not at.exception
    assert at.selectbox(key="hook").value == hook
    assert at.number_input(key="neuron").value == 9
    assert at.select_slider(key="neuron_step").value == 6  # statistics: every capture
    # a link to something the store does not have is ignored, not an error
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(page="attention", layer="99", head="x", step="123456")
    at.run()
    assert not at.exception and not at.error


PHASE_STEPS = [0, 100, 200, 300, 400, 500]
PHASE_JUMP = [0.02, 0.03, 0.05, 0.05, 0.7, 0.8]


@pytest.mark.parametrize("full, link_step", [
    ([0, 100, 200, 300, 400, 500], 400),  # the phase change's own step is a full capture
    ([0, 200, 500], 500),                 # a summary capture: the next full one
    ([0, 200], 200),                      # none after it: the last full one before
])
def test_dynamics_page_marks_the_phase_change(monkeypatch, tmp_path, full, link_step):
    """A store whose layer-1 head 0 jumps from 0.05 to 0.7 between steps 300 and 400: the
    page names step 400, marks it on the heatmap and the curves, and links to that head's
    attention at a full capture."""
    run = write_store(tmp_path / "phase", PHASE_STEPS, full, induction=PHASE_JUMP,
                      icl=[0.0, -0.01, -0.02, -0.02, -0.4, -0.5])
    rs = RunStore(run / "capture.zarr")
    at = app(monkeypatch, "dynamics", run_dir=run)
    ok = " ".join(str(x.value) for x in at.success)
    assert "Induction phase change at step **400**: layer 1 head 0" in ok
    assert "reached 0.70 (it was 0.05 at step 300)" in ok
    assert f"(?page=attention&run=phase&layer=1&head=0&step={link_step})" in ok
    assert link_step in rs.steps("full").tolist()
    assert ("the nearest full capture" in ok) == (link_step != 400)
    c = charts(at)
    heat = c[0]["layout"]
    assert [sh["x0"] for sh in heat["shapes"]] == [4]  # the category index of step 400
    # placed by column index too: the step itself would stretch the category axis
    assert [(a["x"], a["text"]) for a in heat["annotations"]] == [(4, "phase change (step 400)")]
    assert [sh["x0"] for sh in c[1]["layout"]["shapes"]] == [400]  # the per-layer curves
    assert [sh["x0"] for sh in c[2]["layout"]["shapes"]] == [400]  # the logit lens
    # the in-context-learning score: the store's values, the phase change marked
    assert c[3]["layout"]["title"]["text"] == "In-context-learning score by step"
    _, icl = rs.icl()
    np.testing.assert_allclose(arr(c[3]["data"][0]["y"]), icl, rtol=1e-6)
    np.testing.assert_allclose(icl, [0.0, -0.01, -0.02, -0.02, -0.4, -0.5], atol=1e-6)
    assert arr(c[3]["data"][0]["x"]).tolist() == PHASE_STEPS
    assert 400 in [sh.get("x0") for sh in c[3]["layout"]["shapes"]]
    # the top heads at the last step link to a full capture too
    md = " ".join(m.value for m in at.markdown)
    last_full = rs.nearest_steps(500, "full")[0]
    assert f"&step={last_full})" in md and "&step=300)" not in md
    # the logit effects offer the full captures only
    assert at.select_slider(key="dyn_dla_step").options == [str(x) for x in full]


def test_summary_only_store(monkeypatch, tmp_path):
    """A run with summary captures but no full one yet: every page gives sentences, not a
    traceback; the Attention page and the logit effects say why they show nothing."""
    run = write_store(tmp_path / "summ", [0, 10, 20], full=[], status="training")
    rs = RunStore(run / "capture.zarr")
    assert rs.steps("full").tolist() == [] and rs.steps().tolist() == [0, 10, 20]
    at = app(monkeypatch, "training", run_dir=run)
    assert {m.label: (m.value, m.delta) for m in at.metric}["Captures"] == \
        ("3", "0 full · 0 snapshots")
    assert "Full captures (activations, attention, logit effects): none yet" in " ".join(
        c.value for c in at.caption)
    at = app(monkeypatch, "attention", run_dir=run)
    assert "No full capture is committed yet: attention patterns are kept at full captures" \
        in texts(at) and "3 summary captures so far" in texts(at)
    assert not at.get("plotly_chart") and not at.error
    at = app(monkeypatch, "dynamics", run_dir=run)
    assert "neuron logit effects are kept at full captures only" in texts(at)
    assert not at.error
    assert "In-context-learning score by step" in titles(at)
    assert "Top heads at step 20" in " ".join(m.value for m in at.markdown)
    assert "no full capture yet" in " ".join(m.value for m in at.markdown)
    at = app(monkeypatch, "neurons", run_dir=run)
    assert not at.error
    at.selectbox(key="hook").set_value(ACT_HOOK).run()
    assert not at.exception and not at.error
    assert ("step 20 is a summary capture; activations are kept at full captures (none "
            "committed yet)" in " ".join(c.value for c in at.caption))
    at = app(monkeypatch, "store", run_dir=run)
    assert not at.error
    assert at.dataframe[0].value["tiers"].tolist() == ["summary"] * 3
    # a link into the Attention page of this store: a sentence, not an error
    at = app_with_params(monkeypatch, run, page="attention", layer="1", head="0", step="10")
    assert "No full capture is committed yet" in texts(at) and not at.error


def test_dynamics_page_without_dynamics(monkeypatch, dash_runs):
    """A real run with capture.dynamics = false (TINY_ARGS for 2 steps; conftest.py's
    dash_runs trains it beside tiny_run)."""
    at = app(monkeypatch, "dynamics", run_dir=dash_runs["nodyn"])
    assert "stores no training dynamics" in texts(at)


def test_no_runs(monkeypatch, tmp_path):
    at = app(monkeypatch, runs_root=tmp_path)
    assert "No runs under" in texts(at)


def test_runs_root_lists_runs(monkeypatch, tiny_run):
    at = app(monkeypatch, "store", runs_root=tiny_run.parent)
    assert at.sidebar.radio(key="run").options == ["tiny"]
    assert at.header[0].value == "Store"


def _copy(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "capture.zarr", run / "capture.zarr")
    shutil.copy(tiny_run / "config.toml", run / "config.toml")
    return run


def test_empty_store(monkeypatch, tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    w = StoreWriter.open(str(run / "capture.zarr"), durable=False)
    w.rollback_after(-1)
    w.set_status("created")
    w.close()
    for page in ("neurons", "attention", "dynamics"):
        at = app(monkeypatch, page, run_dir=run)
        assert "run is still starting" in texts(at)
    at = app(monkeypatch, "store", run_dir=run)
    assert "No capture and no snapshot committed yet." in " ".join(c.value for c in at.caption)
    at = app(monkeypatch, "training", run_dir=run)
    assert {m.label: (m.value, m.delta) for m in at.metric}["Captures"] == \
        ("0", "0 full · 0 snapshots")


def test_live_run(monkeypatch, tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    w = StoreWriter.open(str(run / "capture.zarr"), durable=False)
    w.set_status("training")
    w.close()
    at = app(monkeypatch, "training", run_dir=run)
    assert "The run is training: this page refreshes every" in texts(at)
    assert {m.label: m.value for m in at.metric}["Status"] == "training"


def test_missing_capture(monkeypatch, tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    at = app(monkeypatch, "neurons", run_dir=run)
    at.select_slider(key="neuron_step").set_value(8).run()
    w = StoreWriter.open(str(run / "capture.zarr"), durable=False)
    w.rollback_after(4)  # a resume from step 4 un-commits steps 6 and 8
    w.close()
    at.run()
    assert not at.exception
    assert "Step 8 is no longer captured" in texts(at)
    assert at.select_slider(key="neuron_step").value == 4


def test_corrupt_metadata(monkeypatch, tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    hook = next(iter(RunStore(run / "capture.zarr").hooks))
    (run / "capture.zarr" / "stats" / hook / "mean" / "zarr.json").write_text("{garbage")
    at = app(monkeypatch, "neurons", run_dir=run)
    assert "metadata cannot be read" in texts(at) and "stats/" in texts(at)
    run2 = _copy(tiny_run, tmp_path / "b")
    (run2 / "capture.zarr" / "zarr.json").write_text("not json")
    at = app(monkeypatch, "training", run_dir=run2)
    assert "metadata cannot be read" in texts(at) and "not valid JSON" in texts(at)


def test_newer_schema(monkeypatch, tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    p = run / "capture.zarr" / "zarr.json"
    meta = json.loads(p.read_text())
    meta["attributes"]["schema_version"] = 99
    p.write_text(json.dumps(meta))
    at = app(monkeypatch, "training", run_dir=run)
    assert "newer version" in texts(at) and "99" in texts(at)
    meta["attributes"]["schema_version"] = 1
    p.write_text(json.dumps(meta))
    at = app(monkeypatch, "training", run_dir=run)
    assert "older version" in texts(at) and "python -m store.upgrade" in texts(at)

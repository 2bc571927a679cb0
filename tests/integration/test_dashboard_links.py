"""Deep links in Streamlit's AppTest, on two real tiny runs under one runs root (conftest.py's
run_pair: "a" and "b", here always "b", the run that is not the picker's first): every
page's view round-trips through the URL, values that do not fit the run fall back to its
defaults without a warning, switching runs leaves nothing of the old run's view behind,
the "rolled back" warning appears for a real rollback only, and a link to a run whose store
is not created yet opens it once it is."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from apptest_env import open_app as _open
from store.writer import StoreWriter

pytestmark = pytest.mark.integration

APP = str(ROOT / "dashboard" / "app.py")
MLP = "blocks.1.mlp.hook_post"

# page -> a view of run "b" that differs from the page's defaults in every parameter
VIEWS = {
    "training": {"logx": "1"},
    "dynamics": {"score": "prev_token", "hook": MLP, "layer": "1", "neuron": "3"},
    "neurons": {"hook": MLP, "neuron": "5", "step": "4", "stat": "max"},
    "attention": {"layer": "1", "head": "1", "seq": "2", "step": "4"},
    "prompt": {"hook": MLP, "neuron": "5", "layer": "1", "head": "1", "step": "3"},
    "store": {"array": "attn/0"},
}
# page -> values run "b" does not have (beyond its layers, heads, width, steps, names)
BAD = {
    "training": {"logx": "maybe"},
    "dynamics": {"score": "bogus", "hook": "nope", "layer": "99", "neuron": "99999"},
    "neurons": {"hook": "nope", "neuron": "99999", "step": "5", "stat": "bogus"},
    "attention": {"layer": "9", "head": "9", "seq": "99", "step": "12345"},
    "store": {"array": "nope"},
}


@pytest.fixture(scope="module")
def root(run_pair) -> Path:
    return run_pair["a"].parent


def open_app(monkeypatch, root: Path, **params):
    """A new browser session of the app listing the runs under `root`, opened at a URL's
    query parameters."""
    return _open(monkeypatch, runs_root=root, **params)


def url(at) -> dict[str, str]:
    return {k: at.query_params[k] for k in at.query_params}


def said(at) -> list[str]:
    """Everything the page says in a box (warning, error, info)."""
    return [str(e.value) for kind in ("warning", "error", "info") for e in getattr(at, kind)]


def titles(at) -> list[str]:
    import json
    return [(json.loads(c.proto.spec)["layout"].get("title") or {}).get("text", "")
            for c in at.get("plotly_chart")]


def widgets(at, page: str) -> dict[str, object]:
    """The page's URL parameters (state.VIEW) as the session holds them."""
    from dashboard import state
    view = state.VIEW[page.capitalize()]
    return {p: at.session_state[key] for p, (key, _) in view.items() if key in at.session_state}


@pytest.mark.parametrize("page", list(VIEWS))
def test_url_round_trip(monkeypatch, root, page):
    from dashboard import state
    at = open_app(monkeypatch, root, page=page, run="b", **VIEWS[page])
    assert at.sidebar.radio(key="run").value == 1  # "b"
    assert not at.warning and not at.error
    view = state.VIEW[page.capitalize()]
    # every parameter of the link set its widget, and the URL still names that view
    got = widgets(at, page)
    for p, raw in VIEWS[page].items():
        assert state.fmt(got[p], view[p][1]) == raw, p
    written = url(at)
    assert {k: written.get(k) for k in ("page", "run", *VIEWS[page])} == {
        "page": page, "run": "b", **VIEWS[page]}
    # the written URL, opened in a new session, is the same view
    again = open_app(monkeypatch, root, **written)
    assert url(again) == written
    assert widgets(again, page) == got
    assert titles(again) == titles(at)


@pytest.mark.parametrize("page", list(BAD))
def test_values_that_do_not_fit_fall_back_silently(monkeypatch, root, page):
    """A link's values that run "b" does not have open the page at b's defaults, without a
    warning: the same view as the bare link to the page."""
    bare = open_app(monkeypatch, root, page=page, run="b")
    at = open_app(monkeypatch, root, page=page, run="b", **BAD[page])
    assert not at.warning and not at.error, said(at)
    assert url(at) == url(bare)
    assert widgets(at, page) == widgets(bare, page)
    assert titles(at) == titles(bare)


def test_prompt_step_outside_the_snapshots_falls_back_silently(monkeypatch, root):
    at = open_app(monkeypatch, root, page="prompt", run="b", step="12345", layer="9",
                  head="9")
    assert not at.warning and not at.error, said(at)
    assert not any("no weight snapshot" in s for s in said(at))
    assert url(at)["step"] == "8" and url(at)["run"] == "b"


@pytest.mark.parametrize("page", ["neurons", "attention", "dynamics"])
def test_switching_runs_leaves_no_stale_value(monkeypatch, root, page):
    """From a linked view of "b" to "a" and back: each run's page at its own defaults (the
    bare link's view), no warning, nothing of the other run's view left."""
    defaults = {r: url(open_app(monkeypatch, root, page=page, run=r)) for r in "ab"}
    at = open_app(monkeypatch, root, page=page, run="b", **VIEWS[page])
    at.session_state["dyn_dla_step"] = 4  # a step of b's logit effects (not in the URL)
    at.sidebar.radio(key="run").set_value(0).run()
    assert not at.exception and not at.warning and not at.error, said(at)
    assert url(at) == defaults["a"]
    assert "dyn_dla_step" not in at.session_state or page == "dynamics"
    if page == "dynamics":
        assert at.select_slider(key="dyn_dla_step").value == 8  # a's latest, not b's 4
    at.sidebar.radio(key="run").set_value(1).run()
    assert not at.exception and not at.warning and not at.error, said(at)
    assert url(at) == defaults["b"]


def page_links(at) -> list[str]:
    """The query strings of the page's links to pages (markdown, captions, boxes)."""
    import re
    text = " ".join(str(e.value) for kind in ("markdown", "caption", "success", "info")
                    for e in getattr(at, kind))
    return re.findall(r"\]\((\?page=[^)\s]+)\)", text)


def test_every_link_carries_the_run_and_opens_its_view(monkeypatch, root, run_pair):
    """The links on run "b"'s Dynamics, Neurons, Attention and Prompt pages: each names run "b";
    up to three of each kind (source page, target page) opened in a new session show "b"
    at exactly the linked values, without a warning (the Prompt page's, whose view the
    round trip above checks, for their values only: a snapshot step, a layer and head
    of the model)."""
    from urllib.parse import parse_qsl

    from store.reader import RunStore
    rs = RunStore(run_pair["b"] / "capture.zarr")
    opened: dict[tuple[str, str], int] = {}
    for page in ("dynamics", "neurons", "attention", "prompt"):
        links = page_links(open_app(monkeypatch, root, page=page, run="b"))
        assert links, page
        for href in dict.fromkeys(links):
            q = dict(parse_qsl(href[1:]))
            assert q["run"] == "b", href
            if q["page"] == "prompt":
                assert int(q.get("step", 0)) in rs.snapshot_steps(), href
                assert int(q.get("layer", 0)) < rs.n_layers, href
                continue
            if opened.get((page, q["page"]), 0) == 3:
                continue
            opened[(page, q["page"])] = opened.get((page, q["page"]), 0) + 1
            at = open_app(monkeypatch, root, **q)
            assert not at.warning and not at.error, (href, said(at))
            assert at.sidebar.radio(key="run").value == 1
            assert {k: url(at).get(k) for k in q} == q, href
    assert {("dynamics", "attention"), ("dynamics", "neurons")} <= set(opened), opened


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run / "capture.zarr", to / "capture.zarr")
    shutil.copy(run / "config.toml", to / "config.toml")
    return to


def _rollback(run: Path, after: int) -> None:
    w = StoreWriter.open(str(run / "capture.zarr"), durable=False)
    w.rollback_after(after)
    w.close()


def test_rolled_back_warning_only_for_a_real_rollback(monkeypatch, run_pair, tmp_path):
    """"b" (captures 0, 1, 2, 4, 6, 8) and "c", a copy rolled back after step 4. Step 8
    from a link into "c", or kept from "b" when switching to "c", is not a rollback; step 8
    seen in "b" and then un-committed by a resume is."""
    b = _copy(run_pair["b"], tmp_path / "b")
    c = _copy(run_pair["b"], tmp_path / "c")
    _rollback(c, 4)
    at = open_app(monkeypatch, tmp_path, page="neurons", run="c", step="8")
    assert not at.warning and at.select_slider(key="neuron_step").value == 4
    at = open_app(monkeypatch, tmp_path, page="neurons", run="b", step="8")
    assert at.select_slider(key="neuron_step").value == 8
    at.sidebar.radio(key="run").set_value(1).run()  # to "c"
    assert not at.warning, said(at)
    assert at.select_slider(key="neuron_step").value == 4
    at.sidebar.radio(key="run").set_value(0).run()  # back to "b", at its latest step
    assert at.select_slider(key="neuron_step").value == 8 and not at.warning
    _rollback(b, 4)  # a resume from step 4 un-commits 6 and 8 of the run on screen
    at.run()
    assert not at.exception
    assert [w.value for w in at.warning] == [
        "Step 8 is no longer captured (a resumed run rolled it back); showing step 4, the "
        "latest captured step."]
    assert at.select_slider(key="neuron_step").value == 4
    at.run()  # said once
    assert not at.warning


def test_link_to_a_run_not_created_yet(monkeypatch, run_pair, tmp_path):
    """A link to a run whose store does not exist yet (a run just launched) waits for it
    without choosing another run, then opens it at the link's view."""
    _copy(run_pair["a"], tmp_path / "a")
    at = open_app(monkeypatch, tmp_path, page="neurons", run="new", step="4")
    assert at.sidebar.radio(key="run").value is None
    assert any("No run 'new'" in s for s in said(at)) and not at.warning
    assert url(at) == {"page": "neurons", "run": "new", "step": "4"}
    assert any("Live: waiting for run 'new'" in c.value for c in at.sidebar.caption)
    _copy(run_pair["b"], tmp_path / "new")
    at.run()
    assert not at.exception and not at.warning, said(at)
    assert at.sidebar.radio(key="run").value == 1
    assert at.select_slider(key="neuron_step").value == 4 and url(at)["run"] == "new"


def test_store_not_created_yet(monkeypatch, run_pair, tmp_path):
    """A run folder given with --run-dir before its training has created the store: a
    sentence, no warning, and the page polls until the store is there."""
    from streamlit.testing.v1 import AppTest

    run = tmp_path / "later"
    monkeypatch.setattr(sys, "argv", ["app.py"])
    monkeypatch.delenv("DASHBOARD_RUNS_ROOT", raising=False)
    monkeypatch.setenv("DASHBOARD_RUN_DIR", str(run))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(page="attention", layer="1")
    at.run()
    assert not at.exception and not at.warning and not at.error
    assert any("No capture store here yet" in s for s in said(at))
    assert any("Live: waiting for this run's store" in c.value for c in at.sidebar.caption)
    _copy(run_pair["b"], run)
    at.run()
    assert not at.exception and not at.warning and not at.error, said(at)
    assert at.selectbox(key="attn_layer").value == 1  # the link's view, seeded once there
    assert not any(c.value.startswith("Live:") for c in at.sidebar.caption)  # finished


def test_a_typed_store_url_round_trips(monkeypatch, root, run_pair):
    """A store typed in the sidebar is in the URL as `store=` (no `run=`): opening that URL
    opens the same store at the same view."""
    typed = str(run_pair["b"])
    at = open_app(monkeypatch, root, page="attention", store=typed, layer="1", head="1")
    assert at.sidebar.text_input(key="typed_url").value == typed
    assert (at.selectbox(key="attn_layer").value, at.selectbox(key="attn_head").value) == (1, 1)
    written = url(at)
    assert "run" not in written and {k: written[k] for k in ("page", "store", "layer", "head")} \
        == {"page": "attention", "store": typed, "layer": "1", "head": "1"}
    assert url(open_app(monkeypatch, root, **written)) == written


@pytest.mark.parametrize("page", list(VIEWS))
def test_every_page_is_live_until_the_run_ends(monkeypatch, run_pair, tmp_path, page):
    """While the run trains every page polls it (the sidebar says so); the rerun after it
    finishes says "finished" and polls no more."""
    run = _copy(run_pair["b"], tmp_path / "b")
    w = StoreWriter.open(str(run / "capture.zarr"), durable=False)
    w.set_status("training")
    w.close()
    at = open_app(monkeypatch, tmp_path, page=page, run="b")
    assert not at.warning and not at.error, said(at)
    assert "Live: this page follows the run (every 2 s)." in [c.value for c in at.sidebar.caption]
    assert at.sidebar.radio(key="run").proto.captions[0].startswith("training ·")
    w = StoreWriter.open(str(run / "capture.zarr"), durable=False)
    w.set_status("finished")
    w.close()
    at.run()
    assert not at.exception and not at.warning and not at.error, said(at)
    assert not any(c.value.startswith("Live:") for c in at.sidebar.caption)
    assert at.sidebar.radio(key="run").proto.captions[0].startswith("finished ·")

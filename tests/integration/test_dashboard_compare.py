"""Runs compared in Streamlit's AppTest on two real tiny runs under one runs root (run_pair:
"b" differs from "a" in train.seed and optim.lr): the Training page overlays each metric of
both runs with the stores' values (smoothed by the debiased EMA, the raw values faintly
behind), against step, tokens or wall time; it lists the config keys that differ and the
chosen run's text samples from its metrics.jsonl; the Dynamics page overlays each run's best
head; the choice lives in the URL."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from apptest_env import arr, open_app
from apptest_env import charts_by_title as by_title
from store.reader import RunStore

pytestmark = pytest.mark.integration

SMOOTH = 0.6


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def texts(at) -> str:
    return " ".join(str(e.value) for kind in ("info", "warning", "error", "caption")
                    for e in getattr(at, kind))


@pytest.fixture(scope="module")
def stores(run_pair) -> dict[str, RunStore]:
    return {k: RunStore(run_pair[k] / "capture.zarr") for k in ("a", "b")}


def test_training_page_overlays_two_runs(monkeypatch, run_pair, stores):
    from dashboard import compare as C

    root = run_pair["a"].parent
    at = open_app(monkeypatch, runs_root=root, page="training", run="a", compare="b",
                  smooth=str(SMOOTH))
    assert at.multiselect(key="_compare_pick").value == ["b"]
    assert at.slider(key="smooth").value == SMOOTH
    figs = by_title(at)
    colour: dict[str, set] = {"a": set(), "b": set()}
    for key, title, split, col in C.METRICS:
        data = figs[title]["data"]
        runs = [d for d in data if d["name"] in ("a", "b")]
        raw = [d for d in data if d["name"].endswith(" (raw)")]
        assert [d["name"] for d in runs] == ["a", "b"], title
        assert [d["name"] for d in raw] == ["a (raw)", "b (raw)"], title
        for name, smooth, faint in zip("ab", runs, raw):
            m = stores[name].metrics(split)
            ok = np.isfinite(m[col])
            assert arr(faint["x"]).tolist() == m["step"][ok].tolist()
            np.testing.assert_allclose(arr(faint["y"]), m[col][ok], rtol=1e-6)
            np.testing.assert_allclose(arr(smooth["y"]), C.ema(m[col][ok], SMOOTH), rtol=1e-6)
            assert faint["opacity"] < 1 and faint["line"]["color"] == smooth["line"]["color"]
            colour[name].add(smooth["line"]["color"])
    assert len(colour["a"]) == len(colour["b"]) == 1 and colour["a"] != colour["b"]

    # the config keys that differ, with each run's value, and nothing equal
    diff = next(d.value for d in at.dataframe if "key" in d.value.columns)
    cfg = {k: s.attrs["run"] for k, s in stores.items()}
    assert sorted(diff["key"]) == ["optim.lr", "train.seed"]
    for row in diff.itertuples():
        sec, name = row.key.split(".")
        assert (row.a, row.b) == (json.dumps(cfg["a"][sec][name]),
                                  json.dumps(cfg["b"][sec][name]))
    # the chosen run's text samples, as its metrics.jsonl has them
    samples = next(d.value for d in at.dataframe if "sample" in d.value.columns)
    want = [(r["step"], r["sample"]) for r in records(run_pair["a"]) if "sample" in r]
    assert want and list(zip(samples["step"], samples["sample"])) == want

    # tokens: step x train.global_batch_tokens; the view is in the URL
    at.radio(key="xaxis").set_value("tokens").run()
    loss = {d["name"]: d for d in by_title(at)["Loss"]["data"]}
    for name in "ab":
        tok = cfg[name]["train"]["global_batch_tokens"]
        steps = stores[name].metrics("train")["step"]
        np.testing.assert_allclose(arr(loss[name]["x"]), steps * tok)
    assert by_title(at)["Loss"]["layout"]["xaxis"]["title"]["text"] == "tokens"
    qp = dict(at.query_params)
    assert (qp["compare"], qp["smooth"], qp["x"]) == ("b", "0.6", "tokens")
    # wall time: from each step's time in metrics.jsonl, since the run's first step
    at.radio(key="xaxis").set_value("time").run()
    loss = {d["name"]: d for d in by_title(at)["Loss"]["data"]}
    t = {r["step"]: r["time"] for r in records(run_pair["b"])}
    steps = stores["b"].metrics("train")["step"]
    np.testing.assert_allclose(arr(loss["b (raw)"]["x"]),
                               [t[int(s)] - min(t.values()) for s in steps], rtol=1e-6)

    # the Dynamics page: the same runs, each run's best head by step
    at.sidebar.radio(key="page").set_value("Dynamics").run()
    assert not at.exception and at.multiselect(key="_compare_pick").value == ["b"]
    best = by_title(at)["Highest induction of any head, by run"]["data"]
    assert [d["name"] for d in best] == ["a", "b"]
    for name, d in zip("ab", best):
        steps, ind = stores[name].head_scores("induction")
        assert arr(d["x"]).tolist() == steps.tolist()
        np.testing.assert_allclose(arr(d["y"]), ind.reshape(len(steps), -1).max(-1),
                                   rtol=1e-6)
    assert dict(at.query_params)["compare"] == "b"
    # none compared: one curve per chart, no config table
    at.multiselect(key="_compare_pick").set_value([]).run()
    assert [d["name"] for d in by_title(at)["Highest induction of any head, by run"]
            ["data"]] == ["a"]
    at.sidebar.radio(key="page").set_value("Training").run()
    figs = by_title(at)
    assert [d["name"] for d in figs["Gradient norm"]["data"]
            if not d["name"].endswith(" (raw)")] == ["a"]
    assert not any("key" in d.value.columns for d in at.dataframe)


def test_store_outside_a_run_folder(monkeypatch, run_pair, tmp_path):
    """A store on its own (no run folder, so no metrics.jsonl): no samples and no wall time,
    each said in a sentence; no other runs to compare."""
    loose = tmp_path / "loose.zarr"
    shutil.copytree(run_pair["a"] / "capture.zarr", loose)
    at = open_app(monkeypatch, run_dir=loose, page="training", x="time")
    assert "Text samples are not available" in texts(at)
    assert "Wall time is not available for loose.zarr" in texts(at)
    assert not at.get("multiselect")
    loss = {d["name"]: d for d in by_title(at)["Loss"]["data"]}
    assert arr(loss["loose.zarr"]["x"]).tolist() == \
        RunStore(loose).metrics("train")["step"].tolist()

"""The runs-compared data of the Training and Dynamics pages (dashboard/compare.py): the
debiased EMA against a hand computation, the config differences, the text samples and wall
times of a metrics.jsonl, the x axes, the best head, and the URL's float parameter."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dashboard import compare as C


def test_ema_is_tensorboards_debiased_average():
    y = [1.0, 3.0, 2.0, 6.0]
    w = 0.5
    # last_n = w*last_{n-1} + (1-w)*y_n from last_0 = 0, divided by 1 - w**n:
    # 0.5 / 0.5 = 1; (0.25 + 1.5) / 0.75; (0.875 + 1) / 0.875; (0.9375 + 3) / 0.9375
    want = [1.0, 1.75 / 0.75, 1.875 / 0.875, 3.9375 / 0.9375]
    np.testing.assert_allclose(C.ema(y, w), want, rtol=1e-12)
    assert C.ema(y, 0.0).tolist() == y  # no smoothing: the raw values
    # non-finite values pass through and do not count
    got = C.ema([1.0, np.nan, 3.0], 0.5)
    assert np.isnan(got[1]) and got[0] == 1.0 and got[2] == pytest.approx(1.75 / 0.75)
    assert C.ema([2.5] * 5, 0.9).tolist() == [2.5] * 5  # constant: exact
    assert len(C.ema([], 0.6)) == 0
    with pytest.raises(ValueError):
        C.ema(y, 1.0)


def test_config_diff_lists_differing_keys_only():
    a = {"run_dir": "runs/a", "train": {"seed": 1337, "max_steps": 8},
         "optim": {"lr": 6e-4, "betas": [0.9, 0.95]}, "log": {"wandb": False}}
    b = {"run_dir": "runs/b", "train": {"seed": 7, "max_steps": 8},
         "optim": {"lr": 3e-3, "betas": [0.9, 0.95]}, "extra": {"x": None}}
    d = C.config_diff({"a": a, "b": b})
    assert list(d.columns) == ["key", "a", "b"]
    rows = {r.key: (r.a, r.b) for r in d.itertuples()}
    # run_dir always differs (the columns already name the runs); equal keys are left out
    assert rows == {"extra.x": ("(not set)", "null"), "log.wandb": ("false", "(not set)"),
                    "optim.lr": ("0.0006", "0.003"), "train.seed": ("1337", "7")}
    assert d["key"].tolist() == sorted(rows)
    assert C.config_diff({"a": a}).empty and C.config_diff({"a": a, "c": dict(a)}).empty
    assert C.flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    assert C.batch_tokens({"train": {"global_batch_tokens": 128}}) == 128
    assert C.batch_tokens({}) is None and C.batch_tokens(None) is None


def test_samples_and_times_from_metrics_jsonl(tmp_path):
    run = tmp_path / "root" / "a"
    (run / "capture.zarr").mkdir(parents=True)
    url = str(run / "capture.zarr")
    assert C.metrics_file(url) is None
    recs = [{"step": 1, "loss": 3.0, "time": 100.0},
            {"step": 2, "loss": 2.0, "time": 101.5, "val_loss": 2.5, "sample": "first\nline"},
            {"step": 3, "loss": 1.0, "time": 103.0},
            {"step": 4, "loss": 1.0, "time": 104.0, "sample": "second"}]
    lines = [json.dumps(r) for r in recs]
    lines.insert(2, '{"step": 9, "loss": ')  # a line torn by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert C.metrics_file(url) == run / "metrics.jsonl"
    got = C.read_records(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    s = C.samples(got)
    pd.testing.assert_frame_equal(s, pd.DataFrame({"step": np.array([2, 4], np.int64),
                                                   "sample": ["first\nline", "second"]}))
    t = C.step_times(got)
    assert t["step"].tolist() == [1, 2, 3, 4] and t["time"].tolist() == [100, 101.5, 103, 104]
    # wall time: seconds since the first logged step, interpolated between logged steps
    np.testing.assert_allclose(C.to_x([1, 2, 4], "time", times=t), [0, 1.5, 4])
    assert C.to_x([1, 2], "time", times=None) is None
    np.testing.assert_allclose(C.to_x([1, 2], "tokens", 128), [128, 256])
    assert C.to_x([1, 2], "tokens", None) is None
    assert C.to_x([1, 2], "step").tolist() == [1, 2]
    assert C.time_unit(59) == (1.0, "s") and C.time_unit(7200) == (60.0, "min")
    assert C.time_unit(1e5) == (3600.0, "h")
    # the runs beside it, by folder name; a store outside a run folder has neither
    (tmp_path / "root" / "b" / "capture.zarr").mkdir(parents=True)
    (tmp_path / "root" / "not_a_run").mkdir()
    assert C.sibling_runs(url) == {"b": str(tmp_path / "root" / "b" / "capture.zarr")}
    assert C.run_name(url) == "a"
    assert C.sibling_runs("s3://bucket/a/capture.zarr") == {}
    assert C.metrics_file(str(tmp_path / "loose.zarr")) is None


def test_series_and_best_head():
    train = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, np.nan, 1.0],
                          "lr": [0.1, 0.2, 0.3], "grad_norm": [1.0, 1.0, 1.0],
                          "tokens_per_s": [10.0, 20.0, 30.0]})
    val = pd.DataFrame({"step": [2], "loss": [2.5]})
    s = C.series(train, val)
    assert list(s) == [m[0] for m in C.METRICS]
    assert s["loss"]["step"].tolist() == [1, 3] and s["val_loss"]["value"].tolist() == [2.5]
    assert C.series(train, pd.DataFrame())["val_loss"].empty
    sc = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # [n, L, H]
    assert C.best_head(sc, "induction").tolist() == [5, 11]
    assert C.best_head(sc, "entropy").tolist() == [0, 6]
    assert C.best_head(sc.reshape(2, 6).T, "induction").tolist() == [5, 11]  # [L*H, n]


def test_float_url_parameter():
    from dashboard import state
    assert state.parse("0.6", float) == 0.6 and state.parse("x", float) is None
    assert state.parse("nan", float) is None
    assert state.fmt(0.6000000000000001, float) == "0.6" and state.fmt(0.0, float) == "0"
    assert state.VIEW["Training"]["compare"] == state.VIEW["Dynamics"]["compare"]

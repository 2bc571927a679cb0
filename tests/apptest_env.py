"""Opening the dashboard in Streamlit's AppTest as a new browser session would, and reading
its plotly charts back as numbers."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np

from helpers import ROOT

APP = str(ROOT / "dashboard" / "app.py")


def open_app(monkeypatch, run_dir=None, runs_root=None, timeout: float = 60, **params):
    """The app on one run (`run_dir`) or the runs under `runs_root`, opened at a URL's query
    parameters, run once; it must not raise."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app.py"])
    for name, value in (("DASHBOARD_RUN_DIR", run_dir), ("DASHBOARD_RUNS_ROOT", runs_root)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.query_params.update(**params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def charts_by_title(at) -> dict[str, dict]:
    return {(c["layout"].get("title") or {}).get("text", ""): c for c in charts(at)}


def arr(v) -> np.ndarray:
    """A plotly trace's data: a list, or plotly's typed array {dtype, bdata[, shape]}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        shape = v.get("shape")
        if isinstance(shape, str):
            shape = [int(x) for x in shape.split(",")]
        return a.reshape(shape) if shape else a
    return np.asarray(v, dtype=float)

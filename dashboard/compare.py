"""Runs compared: the data behind the Training page's overlaid curves and the Dynamics page's
per-run best head. Plain functions over numpy, pandas and files (no Streamlit), so they can
be tested without a server; the pages cache them (data.py's `cached_*` pattern).

A run is a folder holding `capture.zarr` and, when the trainer wrote it, `metrics.jsonl`:
one record per step with its wall-clock "time" and, at evaluations, the text "sample".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from store.runs import STORE_DIR

# (key, chart title, split in the store, column): the five curves overlaid per run.
METRICS = (("loss", "Loss", "train", "loss"),
           ("val_loss", "Validation loss", "val", "loss"),
           ("lr", "Learning rate", "train", "lr"),
           ("grad_norm", "Gradient norm", "train", "grad_norm"),
           ("tokens_per_s", "Tokens per second", "train", "tokens_per_s"))
X_AXES = {"step": "step", "tokens": "tokens", "time": "wall time"}
MAX_SMOOTH = 0.99
# Config keys that always differ between two runs and say nothing about how they trained:
# where the run writes (the table's columns already name the runs).
NOT_COMPARED = ("run_dir",)


# ----------------------------------------------------------------------------- runs

def run_dir_of(url: str) -> Path | None:
    """The run folder of a local store (the folder holding capture.zarr); None for a remote
    store or a store that is not in a run folder (e.g. a copied `*.zarr` on its own)."""
    if "://" in url and not url.startswith("file://"):
        return None
    p = Path(url[len("file://"):] if url.startswith("file://") else url)
    return p.parent if p.name == STORE_DIR else None


def run_name(url: str) -> str:
    """The run's name: its folder's name (as the sidebar and the URL's `run` name it)."""
    d = run_dir_of(url)
    return d.name if d is not None else url.rstrip("/").rsplit("/", 1)[-1]


def sibling_runs(url: str) -> dict[str, str]:
    """{name: store path} of the other runs beside the run of `url` (the run folders with a
    capture.zarr in its runs root, the folder above it), sorted by name; empty for a remote
    store or one outside a run folder. The runs root is found from the run itself, so this
    works for a run opened on its own (`--run-dir`) as for one picked under `--runs-root`."""
    d = run_dir_of(url)
    if d is None:
        return {}
    try:
        here = d.resolve()
        found = sorted(p for p in d.parent.iterdir()
                       if p.is_dir() and (p / STORE_DIR).is_dir() and p.resolve() != here)
    except OSError:
        return {}
    return {p.name: str(p / STORE_DIR) for p in found}


# ----------------------------------------------------------------------------- smoothing

def ema(y, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average: last = w*last + (1-w)*y over the
    finite values, each divided by 1 - w**n (n: finite values so far), so the curve starts
    at the first value instead of rising from zero. Non-finite values stay as they are and
    do not count; a constant series is returned as it is (no rounding drift)."""
    y = np.asarray(y, np.float64)
    w = float(weight)
    if not 0.0 <= w < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1): {weight}")
    out = y.copy()
    ok = np.isfinite(y)
    if w == 0.0 or not ok.any() or np.all(y[ok] == y[ok][0]):
        return out
    last, n = 0.0, 0
    for i in np.nonzero(ok)[0]:
        last = last * w + (1.0 - w) * y[i]
        n += 1
        out[i] = last / (1.0 - w ** n)
    return out


# ----------------------------------------------------------------------------- configs

def flatten(cfg: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {"section.key": value}."""
    out: dict[str, object] = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _shown(v) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v)


def config_diff(configs: dict[str, dict]) -> pd.DataFrame:
    """The config keys whose values differ between the runs: a "key" column ("section.key",
    sorted) and one column per run with its value as text ("(not set)" where a run's config
    lacks the key). Keys equal in every run, and NOT_COMPARED, are left out."""
    flat = {name: flatten(c or {}) for name, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f} - set(NOT_COMPARED))
    missing = object()  # a key one run lacks differs from any value, None included
    rows = []
    for k in keys:
        vals = [f.get(k, missing) for f in flat.values()]
        if any(v is missing for v in vals) or any(v != vals[0] for v in vals[1:]):
            rows.append({"key": k, **{n: "(not set)" if v is missing else _shown(v)
                                      for n, v in zip(flat, vals)}})
    return pd.DataFrame(rows, columns=["key", *flat])


def batch_tokens(cfg: dict | None) -> int | None:
    """train.global_batch_tokens of a resolved run config (tokens per optimizer step)."""
    v = ((cfg or {}).get("train") or {}).get("global_batch_tokens")
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


# ----------------------------------------------------------------------------- metrics.jsonl

def metrics_file(url: str) -> Path | None:
    """RUN/metrics.jsonl beside a local store, when it exists."""
    d = run_dir_of(url)
    f = d / "metrics.jsonl" if d is not None else None
    return f if f is not None and f.is_file() else None


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; lines that do not parse (one torn by a kill, or the
    last one half-written while the run trains) are skipped."""
    out = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def samples(records: list[dict]) -> pd.DataFrame:
    """The text samples written at evaluations: columns step, sample; by step (the last
    record of a step wins, as a resumed run rewrites the steps after its checkpoint)."""
    by = {int(r["step"]): str(r["sample"]) for r in records if "sample" in r}
    steps = sorted(by)
    return pd.DataFrame({"step": np.asarray(steps, np.int64),
                         "sample": [by[s] for s in steps]})


def step_times(records: list[dict]) -> pd.DataFrame:
    """Wall-clock time of each step: columns step, time (seconds since the epoch)."""
    by = {int(r["step"]): float(r["time"]) for r in records
          if isinstance(r.get("time"), (int, float)) and math.isfinite(r["time"])}
    steps = sorted(by)
    return pd.DataFrame({"step": np.asarray(steps, np.int64),
                         "time": np.asarray([by[s] for s in steps], np.float64)})


# ----------------------------------------------------------------------------- series

def series(train: pd.DataFrame, val: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{metric key (METRICS): DataFrame step, value} of one run, finite values only."""
    out = {}
    for key, _, split, col in METRICS:
        df = train if split == "train" else val
        if df is None or not len(df) or col not in df or "step" not in df:
            out[key] = pd.DataFrame({"step": np.zeros(0, np.int64), "value": np.zeros(0)})
            continue
        v = df[col].to_numpy(np.float64)
        ok = np.isfinite(v)
        out[key] = pd.DataFrame({"step": df["step"].to_numpy(np.int64)[ok], "value": v[ok]})
    return out


def time_unit(seconds: float) -> tuple[float, str]:
    """(divisor, unit) for a wall-time axis spanning `seconds`."""
    if seconds < 600:
        return 1.0, "s"
    if seconds < 36_000:
        return 60.0, "min"
    return 3600.0, "h"


def to_x(steps, how: str, tokens_per_step: int | None = None,
         times: pd.DataFrame | None = None) -> np.ndarray | None:
    """The x values of `steps` on the chosen axis: the steps; tokens seen (step x
    train.global_batch_tokens); or wall time in seconds since the run's first logged step
    (from `times`, step_times' frame; steps between two logged ones are interpolated).
    None when the axis cannot be drawn for this run (no batch size, no times)."""
    s = np.asarray(steps, np.float64)
    if how == "step":
        return s
    if how == "tokens":
        return None if not tokens_per_step else s * float(tokens_per_step)
    if how == "time":
        if times is None or not len(times):
            return None
        t = times["time"].to_numpy(np.float64)
        return np.interp(s, times["step"].to_numpy(np.float64), t - t.min())
    raise ValueError(f"unknown x axis {how!r}; axes: {', '.join(X_AXES)}")


def best_head(scores: np.ndarray, score: str) -> np.ndarray:
    """The best head's score at each capture, over every layer and head of [n, L, H] (or
    [L*H, n], head_grid's rows): the highest, but for entropy the lowest (the most focused
    head, as the Dynamics page ranks its top heads)."""
    s = np.asarray(scores, np.float64)
    if s.ndim == 2:  # [L*H, n]
        s = s.T
    s = s.reshape(s.shape[0], -1)
    if not s.shape[0]:
        return np.zeros(0)
    return s.min(axis=1) if score == "entropy" else s.max(axis=1)

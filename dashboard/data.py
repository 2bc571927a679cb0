"""The dashboard's data loading: small, plain functions over a `store.reader.RunStore`.

Every page asks these for its numbers, never the store directly, so the loading can be timed
without a Streamlit server (`benchmarks/dashboard_load.py`) and cached in one place. The
`cached_*` wrappers are keyed on (url, number of committed captures), so a live run's new
captures are picked up on the next rerun while an unchanged store is read once.

Imports: store, numpy, pandas, tiktoken, streamlit, and trainer.tokenizer (the one tokenizer
resolver; it imports no torch) only: no torch, for a fast start.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import streamlit as st

from store.errors import StoreError
from store.reader import RunStore
from store.runs import STORE_DIR, configured_store
from store.runs import store_url as run_store_url  # data.store_url takes any target
DEFAULT_ROOT = "runs"
HEATMAP_MAX_STEPS = 240      # columns of the neuron-by-step heatmap (steps subsampled beyond)
HEATMAP_MAX_NEURONS = 256    # rows of it
STATUS_WORDS = {"created": "starting", "training": "training", "finished": "finished",
                "stopped": "stopped", "failed": "failed"}


# ----------------------------------------------------------------------------- arguments

@dataclass
class Args:
    run_dir: str | None = None
    runs_root: str = DEFAULT_ROOT


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> Args:
    """`streamlit run dashboard/app.py -- --run-dir RUN` or `-- --runs-root DIR` (Streamlit
    passes what follows `--` as sys.argv[1:]); else the environment variables
    DASHBOARD_RUN_DIR / DASHBOARD_RUNS_ROOT; else the runs root `runs/`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    a = Args(run_dir=environ.get("DASHBOARD_RUN_DIR") or None,
             runs_root=environ.get("DASHBOARD_RUNS_ROOT") or DEFAULT_ROOT)
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--run-dir", "--runs-root"):
            if arg == flag and i + 1 < len(argv):
                setattr(a, flag[2:].replace("-", "_"), argv[i + 1])
                i += 1
            elif arg.startswith(flag + "="):
                setattr(a, flag[2:].replace("-", "_"), arg.split("=", 1)[1])
        i += 1
    return a


# ----------------------------------------------------------------------------- runs

def store_url(target: str) -> str:
    """A run dir, a store dir or an fsspec URL -> the store's URL."""
    t = str(target).strip().rstrip("/")
    if "://" in t and not t.startswith("file://"):
        return t if t.endswith(".zarr") else f"{t}/{STORE_DIR}"
    p = Path(t[len("file://"):] if t.startswith("file://") else t).expanduser()
    if (p / STORE_DIR).exists():
        return str(p / STORE_DIR)
    if (p / "zarr.json").exists():  # the store folder itself
        return str(p)
    return run_store_url(p, configured_store(p))  # maybe trained with capture.store=s3://...


def find_runs(root: str) -> list[str]:
    """Run folders (those with a capture.zarr) at `root` and one level below, sorted."""
    r = Path(root).expanduser()
    if not r.is_dir():
        return []
    found = [r] if (r / STORE_DIR).is_dir() else []
    try:
        found += sorted(p for p in r.iterdir() if p.is_dir() and (p / STORE_DIR).is_dir())
    except OSError:
        pass
    return [str(p) for p in found]


def run_summary(url: str) -> dict:
    """A run's one-line summary: status, n_layer, n_embd, captures committed (and how many
    of them full), weight snapshots, planned steps; or the store's one-line error. Captures
    are appended as they are taken: there is no schedule in the store to count against."""
    out: dict = {"url": url, "error": None}
    try:
        rs = RunStore(url)
        model = rs.attrs.get("model") or (rs.attrs.get("run") or {}).get("model") or {}
        out.update(status=rs.status, n_layer=model.get("n_layer"), n_embd=model.get("n_embd"),
                   captured=int(len(rs.steps())), full=int(len(rs.steps("full"))),
                   snapshots=len(rs.snapshot_steps()), max_steps=rs.max_steps)
    except StoreError as e:
        out["error"] = str(e)
    return out


def captures_line(captured: int, full: int, snapshots: int) -> str:
    """"11 (7 full) · 9 snapshots": the Training page's Captures metric and the sidebar's."""
    return (f"{captured} ({full} full) · {snapshots} snapshot"
            f"{'' if snapshots == 1 else 's'}")


def summary_line(s: dict) -> str:
    if s.get("error"):
        return f"cannot be read: {s['error']}"
    return (f"{STATUS_WORDS.get(s['status'], s['status'])} · {s['n_layer']} layers x "
            f"{s['n_embd']} · captures {captures_line(s['captured'], s['full'], s['snapshots'])}"
            f" · {s['max_steps']} steps planned")


def nearest_full(rs: RunStore, step: int) -> int | None:
    """The full capture to show for `step` (attention, activations, logit effects): the
    nearest full step at or after it, else the last one before it; None without any."""
    before, after = rs.nearest_steps(int(step), "full")
    return after if after is not None else before


# ----------------------------------------------------------------------------- tokens

def tokenizer_file(rs: RunStore) -> str | None:
    """The GPT-2 BPE file of the run, found as every command finds it
    (trainer.tokenizer.local_bpe_file); None without one (the dashboard then shows ids)."""
    from trainer.tokenizer import local_bpe_file

    data = (rs.attrs.get("run") or {}).get("data") or {}
    return local_bpe_file("", data.get("tokenizer_file") or "", data.get("dir") or "") or None


def make_decoder(bpe_file: str | None) -> Callable[[int], str]:
    """token id -> its text, from a tiktoken GPT-2 BPE file (offline); without one, the id
    itself as `#id`."""
    if bpe_file:
        try:
            from trainer.tokenizer import get_encoding

            enc = get_encoding(bpe_file)

            def decode(t: int) -> str:
                try:
                    return enc.decode_single_token_bytes(int(t)).decode("utf-8", "replace")
                except (KeyError, ValueError):
                    return f"#{int(t)}"
            return decode
        except Exception:  # noqa: BLE001 - any tokenizer problem: fall back to ids
            pass
    return lambda t: f"#{int(t)}"


# ----------------------------------------------------------------------------- pages' data

def training_data(rs: RunStore) -> dict:
    """Training page: train and val metrics as DataFrames, the captured steps (all, and the
    full ones), the weight snapshots' steps."""
    train = pd.DataFrame(rs.metrics("train"))
    val = pd.DataFrame(rs.metrics("val"))
    val = val.dropna(axis=1, how="all") if len(val) else val
    return {"train": train, "val": val, "captured": rs.steps(), "full": rs.steps("full"),
            "snapshots": np.asarray(rs.snapshot_steps(), np.int64)}


def neuron_table(rs: RunStore, hook: str, step: int) -> pd.DataFrame:
    """Neurons page: every statistic of every neuron of `hook` at `step` (D rows)."""
    st_ = rs.stats_at(hook, step)
    df = pd.DataFrame({k: np.asarray(v, np.float32) for k, v in st_.items()})
    df.index.name = "neuron"
    return df


def neuron_history(rs: RunStore, hook: str, neuron: int) -> pd.DataFrame:
    """One neuron across training: mean, std, max, frac_active per captured step. The max
    is also the neuron's top-1 activation (the top value across steps)."""
    cols = {}
    steps = None
    for s in ("mean", "std", "max", "frac_active"):
        steps, cols[s] = rs.stat(hook, s, neuron)
    return pd.DataFrame({"step": steps, **cols})


def _stat_block(rs: RunStore, hook: str, stat: str, lo: int, hi: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, [n_steps, hi - lo]) of a range of neurons over the committed captures, read
    with one slice (C/32 x (hi-lo)/128 chunks), not neuron by neuron."""
    D = rs.hooks[hook]
    lo, hi = max(0, int(lo)), min(D, int(hi))
    return rs.stat(hook, stat, slice(lo, min(max(hi, lo), D)))


def neuron_heatmap(rs: RunStore, hook: str, stat: str, lo: int, hi: int,
                   max_steps: int = HEATMAP_MAX_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Neuron-by-step heatmap: (steps shown, [neurons, steps]); at most `max_steps` columns
    (evenly subsampled, first and last kept) and HEATMAP_MAX_NEURONS rows."""
    hi = min(int(hi), int(lo) + HEATMAP_MAX_NEURONS)
    steps, block = _stat_block(rs, hook, stat, lo, hi)
    if len(steps) > max_steps:
        keep = np.unique(np.linspace(0, len(steps) - 1, max_steps).round().astype(int))
        steps, block = steps[keep], block[keep]
    return steps, block.T


def top_tokens(rs: RunStore, hook: str, step: int, neuron: int, decode: Callable[[int], str],
               window: int = 8, rows: int = 8, after: int = 2,
               col: np.ndarray | None = None) -> list[dict]:
    """The neuron's top-activating tokens at `step`, each with its context: tokens
    [pos - window, pos + after] of its sequence and the neuron's activation at each. The
    top-k and the tokens are in every capture; the activations of the context only in a full
    capture of a hook that keeps them (`from_acts` says which), else only the top token's
    value is known. `col`: the neuron's activations [P, T] when already read (then no
    activation is read here)."""
    vals, seqs, poss = rs.topk(hook, step, neuron)
    vals, seqs, poss = vals[:rows], seqs[:rows], poss[:rows]
    if not len(vals):
        return []
    full = col is None and hook in rs.act_hooks and int(step) in set(rs.steps("full").tolist())
    probe = rs.probe_tokens()
    toks_of: dict[int, np.ndarray] = {}
    acts_of: dict[int, np.ndarray | None] = {}
    out = []
    for v, s, p in zip(vals, seqs, poss):
        s, p = int(s), int(p)
        if s not in toks_of:
            toks_of[s] = probe[s] if probe is not None else rs.tokens(step, s)
            acts_of[s] = col[s] if col is not None else None
            if full:
                a = rs.activations(hook, step, s)[:, neuron].astype(np.float32)
                acts_of[s] = None if np.isnan(a).all() else a
        t0, t1 = max(0, p - window), min(rs.seq_len, p + after + 1)
        toks = toks_of[s][t0:t1]
        a = acts_of[s]
        acts = a[t0:t1] if a is not None else np.where(np.arange(t0, t1) == p, v, np.nan)
        out.append({"value": float(v), "seq": s, "pos": p, "start": t0,
                    "tokens": [decode(t) for t in toks], "acts": acts.tolist(),
                    "from_acts": a is not None})
    return out


def attention_data(rs: RunStore, layer: int, step: int, seq: int,
                   decode: Callable[[int], str]) -> dict:
    """Attention page: the pattern of every head [H, Ta, Ta] at a full capture (the first
    Ta = rs.attn_len query and key positions) and the labels of those Ta tokens."""
    pat = rs.attention(layer, step, seq).astype(np.float32)
    probe = rs.probe_tokens()
    toks = probe[seq] if probe is not None else rs.tokens(step, seq)
    Ta = min(rs.attn_len, pat.shape[-1])
    labels = [f"{i}:{decode(t)!r}"[:18] for i, t in enumerate(toks[:Ta])]
    return {"pattern": pat, "labels": labels}


def icl_data(rs: RunStore) -> pd.DataFrame:
    """Dynamics page: the in-context-learning score at every capture (rs.icl())."""
    steps, score = rs.icl()
    return pd.DataFrame({"step": np.asarray(steps, np.int64),
                         "icl": np.asarray(score, np.float32)})


def captures_table(rs: RunStore) -> pd.DataFrame:
    """Store page: one row per committed capture or weight snapshot, by step: the tiers the
    capture holds ("summary", "summary, full"; "" for a snapshot without a capture) and
    whether the weights at that step are stored."""
    tiers = rs.tiers()
    snaps = set(rs.snapshot_steps())
    steps = sorted(set(tiers) | snaps)
    return pd.DataFrame({"step": np.asarray(steps, np.int64),
                         "tiers": [", ".join(tiers.get(s, [])) for s in steps],
                         "snapshot": [s in snaps for s in steps]})


def arrays_table(rs: RunStore, sizes: bool = True) -> pd.DataFrame:
    """Store page: every array with shape, dtype, chunks, bytes on disk and its axes."""
    rows = []
    for a in rs.arrays(sizes=sizes):
        rows.append({
            "path": a["path"], "shape": " x ".join(map(str, a["shape"])), "dtype": a["dtype"],
            "chunks": " x ".join(map(str, a["chunks"])), "codecs": ", ".join(a["codecs"]),
            "bytes on disk": a["bytes_stored"], "bytes (full)": a["bytes"],
            "meaning": a["meaning"], "written by": a["written_by"],
            "axes": " | ".join(f"axis {i} ({n}): {s}" for i, (n, s) in enumerate(
                (x.split(": ", 1) + [""])[:2] for x in a["axes"])),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- caching

@st.cache_resource(show_spinner=False, max_entries=16)
def get_store(url: str) -> RunStore:
    return RunStore(url)


@st.cache_resource(show_spinner=False, max_entries=4)
def get_decoder(bpe_file: str | None) -> Callable[[int], str]:
    return make_decoder(bpe_file)


def n_committed(url: str) -> int:
    return int(len(get_store(url).steps()))


def live_key(url: str) -> tuple:
    """What changes as a run goes on: (status, committed captures, weight snapshots), or
    ("absent",) while the store does not exist. The live pages poll it (state.watch); it
    reads the store's root metadata and capture index only."""
    try:
        rs = get_store(url)
        return rs.status, int(len(rs.steps())), len(rs.snapshot_steps())
    except StoreError as e:
        return ("absent", type(e).__name__)


# `key` (live_key) is a cache key only: a run's summary is re-read when it changes.
@st.cache_data(show_spinner=False, max_entries=64)
def cached_summary(url: str, key: tuple = ()) -> dict:
    return run_summary(url)


# `n` (committed captures) and `tick` (a coarse clock for live metrics) are cache keys only.
@st.cache_data(show_spinner=False, max_entries=8)
def cached_training(url: str, n: int, tick: int) -> dict:
    return training_data(get_store(url))


@st.cache_data(show_spinner=False, max_entries=64)
def cached_neuron_table(url: str, n: int, hook: str, step: int) -> pd.DataFrame:
    return neuron_table(get_store(url), hook, step)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_neuron_history(url: str, n: int, hook: str, neuron: int) -> pd.DataFrame:
    return neuron_history(get_store(url), hook, neuron)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_heatmap(url: str, n: int, hook: str, stat: str, lo: int, hi: int):
    return neuron_heatmap(get_store(url), hook, stat, lo, hi)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_attention(url: str, n: int, layer: int, step: int, seq: int) -> dict:
    rs = get_store(url)
    return attention_data(rs, layer, step, seq, get_decoder(tokenizer_file(rs)))


@st.cache_data(show_spinner=False, max_entries=8)
def cached_icl(url: str, n: int) -> pd.DataFrame:
    return icl_data(get_store(url))


@st.cache_data(show_spinner=False, max_entries=8)
def cached_captures(url: str, n: int, snaps: int) -> pd.DataFrame:
    return captures_table(get_store(url))


@st.cache_data(show_spinner=False, max_entries=8)
def cached_arrays(url: str, n: int, sizes: bool) -> pd.DataFrame:
    return arrays_table(get_store(url), sizes)

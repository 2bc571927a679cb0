"""One neuron's data for the Neurons page (and the logit effects the Dynamics page shows too):
its activations over the capture's tokens at a full capture, their histogram, examples drawn
from across its activation range, its promoted and suppressed tokens, and a search of every
neuron of a hook by the tokens in their top examples or the tokens they promote.

Plain functions over a `store.reader.RunStore` (timed without Streamlit, like data.py's) and
`cached_*` wrappers keyed on (url, number of committed captures), as in data.py.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import data as D
from store.reader import RunStore

CONTEXT = 32              # tokens of context shown on each side of an example
RANGE_BINS = 5            # intervals of the activation range sampled for examples
RANGE_PER_BIN = 3         # examples shown per interval
HIST_BINS = 40
READ_BYTES = 64 << 20     # activations read at a time: a neuron's column needs every sequence
_MLP = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


# ----------------------------------------------------------------------------- hooks

def mlp_layer(hook: str) -> int | None:
    """The layer of an MLP-neuron hook ("blocks.3.mlp.hook_post" -> 3), else None."""
    m = _MLP.match(hook)
    return int(m.group(1)) if m else None


def default_hook(rs: RunStore) -> str | None:
    """The hook the page opens on: the first MLP-neuron hook (neurons are what the page is
    about; a residual stream's dimensions are not), else the first hook."""
    hooks = list(rs.hooks)
    return next((h for h in hooks if mlp_layer(h) is not None), hooks[0] if hooks else None)


def dla_layer(rs: RunStore, hook: str) -> int | None:
    """The layer whose stored logit effects belong to `hook`'s neurons, else None."""
    layer = mlp_layer(hook)
    ok = layer is not None and layer in rs.dla_layers and rs.hooks.get(hook) == rs.d_mlp
    return layer if ok else None


def has_acts(rs: RunStore, hook: str, step: int) -> bool:
    """Whether `hook`'s activations at `step` are stored (a full capture of an act hook)."""
    return hook in rs.act_hooks and int(step) in set(rs.steps("full").tolist())


def seq_tokens(rs: RunStore, step: int) -> np.ndarray:
    """The token ids [P, T] the capture at `step` ran on (the probe set when it has one)."""
    probe = rs.probe_tokens()
    return probe if probe is not None else rs.tokens(step)


# ----------------------------------------------------------------------------- activations

def neuron_acts(rs: RunStore, hook: str, step: int, neuron: int) -> np.ndarray | None:
    """The neuron's activation at every token of the capture, [P, T] float32, from the full
    tier; None where they are not stored (a summary capture, a statistics-only hook, or
    chunks never written). A chunk holds one sequence's every neuron, so the column costs a
    read of all of them: a few sequences at a time keep the memory small."""
    if not has_acts(rs, hook, step):
        return None
    P, T, width = rs.n_seqs, rs.seq_len, rs.act_hooks[hook]
    per = max(1, READ_BYTES // max(1, T * width * 2))
    col = np.concatenate([rs.activations(hook, step, slice(i, min(P, i + per)))[:, :, neuron]
                          .astype(np.float32) for i in range(0, P, per)])
    return None if np.isnan(col).all() else col


def histogram(col: np.ndarray, bins: int = HIST_BINS) -> dict:
    """Counts of the finite activations in `bins` equal bins from their min to their max."""
    v = col[np.isfinite(col)]
    if not len(v):
        return {"counts": np.zeros(0, np.int64), "edges": np.zeros(0), "n": 0}
    counts, edges = np.histogram(v, bins=bins)
    return {"counts": counts, "edges": edges, "n": int(len(v))}


def example(tokens: np.ndarray, acts: np.ndarray | None, seq: int, pos: int, value: float,
            decode: Callable[[int], str], window: int = CONTEXT) -> dict:
    """One token with up to `window` tokens each side (what its sequence has), in the form
    neurons.tokens_html draws: the activation of each context token where known."""
    T = len(tokens)
    t0, t1 = max(0, pos - window), min(T, pos + window + 1)
    a = acts[t0:t1] if acts is not None else np.where(np.arange(t0, t1) == pos, value, np.nan)
    return {"value": float(value), "seq": int(seq), "pos": int(pos), "start": int(t0),
            "tokens": [decode(t) for t in tokens[t0:t1]], "acts": a.tolist(),
            "from_acts": acts is not None}


def range_examples(col: np.ndarray, tokens: np.ndarray, decode: Callable[[int], str],
                   bins: int = RANGE_BINS, per_bin: int = RANGE_PER_BIN,
                   window: int = CONTEXT, seed: int = 0) -> list[dict]:
    """Examples from across the activation range: `bins` equal intervals from the minimum to
    the maximum, highest first, each with up to `per_bin` of its tokens drawn at random
    (a fixed seed: the same view on every rerun) and how many tokens it holds. The top
    examples show only the peak; these show what the neuron does the rest of the time."""
    ok = np.isfinite(col)
    if not ok.any():
        return []
    lo, hi = float(col[ok].min()), float(col[ok].max())
    edges = np.linspace(lo, hi, bins + 1)
    rng = np.random.default_rng(seed)
    out = []
    for b in range(bins - 1, -1, -1):
        inside = ok & (col >= edges[b]) & ((col < edges[b + 1]) if b < bins - 1
                                           else (col <= edges[b + 1]))
        where = np.argwhere(inside)
        pick = where[np.sort(rng.choice(len(where), min(per_bin, len(where)), replace=False))] \
            if len(where) else where
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(len(where)),
                    "rows": sorted((example(tokens[s], col[s], s, p, col[s, p], decode, window)
                                    for s, p in pick.tolist()), key=lambda r: -r["value"])})
    return out


# ----------------------------------------------------------------------------- logit effects

def logit_effects(rs: RunStore, layer: int, step: int, neuron: int,
                  decode: Callable[[int], str]) -> pd.DataFrame:
    """The tokens an MLP neuron most promotes and suppresses through the unembedding (from
    the weights at a full capture), decoded, with their effects."""
    d = rs.neuron_logits(layer, step, neuron)
    return pd.DataFrame({
        "promotes": [repr(decode(t)) for t in d["top_token"]],
        "effect +": np.round(d["top_value"], 4),
        "suppresses": [repr(decode(t)) for t in d["bottom_token"]],
        "effect -": np.round(d["bottom_value"], 4)})


# ----------------------------------------------------------------------------- search

def _norm(text: str) -> str:
    return text.strip().lower()


def search_index(rs: RunStore, hook: str, step: int, decode: Callable[[int], str]) -> dict:
    """What the search looks through, for every neuron of `hook` at `step`: the token ids of
    its top-k examples and their values, and (MLP hooks with logit effects) the tokens it
    promotes at the nearest full capture. One read of each whole array at that capture: the
    reader's per-neuron methods would read the same chunks once per neuron."""
    s = rs.slot(step)
    val = rs._read(f"topk/{hook}/value", (s,))
    idx = rs._read(f"topk/{hook}/index", (s,)).astype(np.int64)
    toks = seq_tokens(rs, step).reshape(-1)
    top = np.where(idx >= 0, toks[np.clip(idx, 0, None)], -1)
    out = {"top": top, "value": np.where(idx >= 0, val, np.nan), "promotes": None,
           "dla_step": None}
    layer = dla_layer(rs, hook)
    full = D.nearest_full(rs, step)
    if layer is not None and full is not None:
        out["promotes"] = rs._read(f"dla/{layer}/top_token", (rs.slot(full, "full"),))
        out["dla_step"] = int(full)
    ids = np.unique(np.concatenate([top.reshape(-1)] + (
        [out["promotes"].reshape(-1)] if out["promotes"] is not None else [])))
    out["text"] = {int(t): _norm(decode(t)) for t in ids if t >= 0}
    return out


def search(index: dict, query: str, limit: int | None = None) -> pd.DataFrame:
    """Neurons whose top examples hold the token `query` or that promote it (the token's
    text, case and surrounding spaces aside), most matches first: per neuron how many of its
    top-k examples are that token, its rank among the promoted tokens (0: not among them),
    and its top activation; at most `limit` of them."""
    q = _norm(query)
    cols = {"in top examples": [], "promotes (rank)": [], "top activation": []}
    if not q:
        return pd.DataFrame(cols, index=pd.Index([], name="neuron"))
    ids = np.array([t for t, x in index["text"].items() if x == q], np.int64)
    in_top = np.isin(index["top"], ids).sum(axis=1)
    rank = np.zeros(len(in_top), np.int64)
    if index["promotes"] is not None:
        hit = np.isin(index["promotes"], ids)
        rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)
    found = np.nonzero((in_top > 0) | (rank > 0))[0]
    best = np.nanmax(np.where(np.isnan(index["value"]), -np.inf, index["value"]), axis=1)
    order = sorted(found, key=lambda n: (-in_top[n], rank[n] or 1 << 30, -best[n]))[:limit]
    return pd.DataFrame({"in top examples": in_top[order].astype(np.int64),
                         "promotes (rank)": rank[order].astype(np.int64),
                         "top activation": best[order].astype(np.float32)},
                        index=pd.Index(np.asarray(order, np.int64), name="neuron"))


# ----------------------------------------------------------------------------- view helpers

def window(neuron: int, width: int, size: int) -> tuple[int, int]:
    """[lo, hi): `size` neurons around `neuron`, kept within 0..width."""
    size = max(1, min(int(size), int(width)))
    lo = min(max(0, int(neuron) - size // 2), int(width) - size)
    return lo, lo + size


def picked(index, rows) -> int | None:
    """The neuron of a table's selected row: Streamlit gives the row's position in the data
    passed (not its place on screen, which the user may have sorted), so it is looked up in
    that data's index, the neuron ids."""
    return int(index[rows[0]]) if rows and 0 <= rows[0] < len(index) else None


# ----------------------------------------------------------------------------- caching

@st.cache_data(show_spinner=False, max_entries=32)
def cached_neuron_acts(url: str, n: int, hook: str, step: int, neuron: int):
    return neuron_acts(D.get_store(url), hook, step, neuron)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_range_examples(url: str, n: int, hook: str, step: int, neuron: int) -> list[dict]:
    rs = D.get_store(url)
    col = cached_neuron_acts(url, n, hook, step, neuron)
    if col is None:
        return []
    return range_examples(col, seq_tokens(rs, step), D.get_decoder(D.tokenizer_file(rs)))


@st.cache_data(show_spinner=False, max_entries=32)
def cached_top_examples(url: str, n: int, hook: str, step: int, neuron: int) -> list[dict]:
    rs = D.get_store(url)
    col = cached_neuron_acts(url, n, hook, step, neuron)
    return D.top_tokens(rs, hook, step, neuron, D.get_decoder(D.tokenizer_file(rs)),
                        window=CONTEXT, after=CONTEXT, rows=rs.k, col=col)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_logit_effects(url: str, n: int, layer: int, step: int, neuron: int) -> pd.DataFrame:
    rs = D.get_store(url)
    return logit_effects(rs, layer, step, neuron, D.get_decoder(D.tokenizer_file(rs)))


@st.cache_data(show_spinner=False, max_entries=8)
def cached_search_index(url: str, n: int, hook: str, step: int) -> dict:
    rs = D.get_store(url)
    return search_index(rs, hook, step, D.get_decoder(D.tokenizer_file(rs)))

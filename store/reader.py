"""RunStore: the lazy reader of a run's capture store (the dashboard's and export's view).

Opening reads the root zarr.json only; every method reads only the chunks its answer needs
(contract 4), and sees only committed captures (captures/step[c] != -1), so it can read a
store while a run writes it. numpy and zarr only: no torch here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from ._common import layout_of, open_array, open_store, read_root, url_str
from ._io import getsize_prefix
from .dynamics import (ALIVE_ABOVE, DEAD_BELOW, NeuronEvents, PhaseChange, neuron_events,
                       phase_change)
from .errors import CorruptStore, StoreError
from .schema import AXES, STATS, TIERS, Layout, repeated_positions
from .snapshots import read_snapshot_file, snapshot_steps

_RETRIES = 3  # a chunk replaced under a reader on a store without atomic writes: read again


class RunStore:
    """A run's capture store, read lazily. `url`: a path, a file:// or other fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url_str(url)
        self._store = open_store(url, storage_options, read_only=True)
        self._arrays: dict[str, zarr.Array] = {}
        self._C: int | None = None
        self._set_attrs(read_root(self._store, self.url))

    def _set_attrs(self, attrs: dict) -> None:
        L = layout_of(attrs, self.url)
        self.attrs: dict = attrs
        self.schema_version: int = int(attrs["schema_version"])
        self.layout: Layout = L
        # k of the top-k is `k` (and layout.topk): `topk` is the method reading them
        self.n_seqs, self.seq_len, self.k = L.n_seqs, L.seq_len, L.topk
        # hooks: every hook with per-neuron statistics and top-k (summary tier, every
        # capture); act_hooks: those whose activations full captures keep
        self.hooks: dict[str, int] = dict(L.widths)
        self.stat_hooks: dict[str, int] = dict(L.stat_hooks)
        self.act_hooks: dict[str, int] = dict(L.act_hooks)
        self.attn_layers: list[int] = L.stored_attn_layers
        self.n_heads, self.attn_seqs, self.attn_len = L.n_heads, L.attn_seqs, L.attn_len
        self.has_token_loss = L.token_loss
        self.source, self.max_steps, self.world = L.source, L.max_steps, L.world
        # training dynamics (empty for stores written without them)
        self.head_score_names: list[str] = list(L.head_scores)
        self.n_layers, self.has_lens = L.n_layers, L.logit_lens
        self.dla_layers, self.d_mlp, self.dla_k = list(L.dla_layers), L.d_mlp, L.dla_k
        # the repeated-token probe's attention (0: not in this store, e.g. written before it)
        self.repeat_attn_seqs, self.repeat_attn_len = L.repeat_attn_seqs, L.repeat_attn_len

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    # ------------------------------------------------------------------ live root attrs

    def refresh(self) -> None:
        """Re-read the root attributes (status, run config; a resume may extend the layout)."""
        self._set_attrs(read_root(self._store, self.url))
        self._arrays.clear()

    @property
    def status(self) -> str:
        """The run's status, re-read from the store on every access."""
        try:
            self.attrs = read_root(self._store, self.url)
        except StoreError:
            pass  # keep the last one seen
        return str(self.attrs.get("status", "unknown"))

    @property
    def updated_at(self) -> str | None:
        return self.attrs.get("updated_at")

    # ------------------------------------------------------------------ reading

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            try:
                arr = open_array(self._store, path, "r")
            except (FileNotFoundError, KeyError) as e:
                raise CorruptStore(f"store {self.url} is corrupt: array {path} is missing "
                                   f"({type(e).__name__})") from None
            self._arrays[path] = arr
        return arr

    def _read(self, path: str, sel: Any) -> np.ndarray:
        for attempt in range(_RETRIES):
            try:
                return np.asarray(self._array(path)[sel])
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - zarr/codec/fs errors, worded below
                if attempt == _RETRIES - 1:
                    raise CorruptStore(f"cannot read {path} of store {self.url}: "
                                       f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                                       ) from None
                self._arrays.pop(path, None)
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _committed(self) -> tuple[np.ndarray, np.ndarray]:
        """(committed steps ascending, their slots), from a fresh read of captures/step."""
        for attempt in range(_RETRIES):
            try:
                arr = open_array(self._store, "captures/step", "r")
                vals = np.asarray(arr[:])
                break
            except (FileNotFoundError, KeyError):
                return np.zeros(0, np.int64), np.zeros(0, np.int64)  # still being created
            except Exception as e:  # noqa: BLE001
                if attempt == _RETRIES - 1:
                    raise CorruptStore(f"cannot read captures/step of store {self.url}: "
                                       f"{type(e).__name__}: {e}") from None
                time.sleep(0.05 * (attempt + 1))
        if self._C != arr.shape[0]:  # a resume extended the store: array metadata is stale
            if self._C is not None:
                self._arrays.clear()
            self._C = arr.shape[0]
        self._arrays["captures/step"] = arr
        slots = np.nonzero(vals >= 0)[0]
        steps = vals[slots]
        order = np.argsort(steps, kind="stable")
        return steps[order].astype(np.int64), slots[order].astype(np.int64)

    def _with_tiers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(committed steps, their slots, their tier bits)."""
        steps, slots = self._committed()
        if not len(steps):
            return steps, slots, np.zeros(0, np.uint8)
        m = int(slots.max()) + 1
        bits = self._read("captures/tier", (slice(0, m),))[slots]
        return steps, slots, bits.astype(np.uint8)

    def steps(self, tier: str | None = None) -> np.ndarray:
        """Committed steps, ascending (re-read on every call: the store may be live);
        with `tier` ("summary" or "full"), only the captures that hold it."""
        if tier is None or tier == "summary":
            return self._committed()[0]
        bit = self._tier_bit(tier)
        steps, _, bits = self._with_tiers()
        return steps[(bits & bit) != 0]

    def tiers(self) -> dict[int, list[str]]:
        """{committed step: the tiers it holds, e.g. ["summary", "full"]}."""
        steps, _, bits = self._with_tiers()
        return {int(s): [n for n, b in TIERS.items() if int(t) & b]
                for s, t in zip(steps, bits)}

    @staticmethod
    def _tier_bit(tier: str) -> int:
        if tier not in TIERS:
            raise StoreError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        return TIERS[tier]

    def nearest_steps(self, step: int, tier: str | None = None
                      ) -> tuple[int | None, int | None]:
        """(the largest committed step <= step, the smallest committed step >= step), of
        the captures holding `tier` when given."""
        steps = self.steps(tier)
        i = int(np.searchsorted(steps, int(step), side="right"))
        before = int(steps[i - 1]) if i > 0 else None
        j = int(np.searchsorted(steps, int(step), side="left"))
        after = int(steps[j]) if j < len(steps) else None
        return before, after

    def slot(self, step: int, tier: str | None = None) -> int:
        """The slot of a committed step (holding `tier`, when given); StoreError naming
        the nearest ones otherwise."""
        steps, slots = self._committed()
        step = int(step)
        i = int(np.searchsorted(steps, step))
        if i < len(steps) and steps[i] == step:
            s = int(slots[i])
            if tier is None or tier == "summary":
                return s
            if int(self._read("captures/tier", (s,))) & self._tier_bit(tier):
                return s
            full = self.steps(tier)
            j = int(np.searchsorted(full, step))
            near = ", ".join(f"{w} {int(x)}" for w, x in
                             (("before", full[j - 1] if j > 0 else None),
                              ("after", full[j] if j < len(full) else None)) if x is not None)
            raise StoreError(f"step {step} has a summary capture only; its activations and "
                             f"attention are kept at {tier} captures"
                             f"{': nearest ' + near if near else ' (none committed yet)'}")
        if not len(steps):
            raise StoreError(f"step {step} is not captured: store {self.url} has no committed "
                             f"captures yet")
        before = int(steps[i - 1]) if i > 0 else None
        after = int(steps[i]) if i < len(steps) else None
        near = ", ".join(f"{w} {s}" for w, s in (("before", before), ("after", after))
                         if s is not None)
        raise StoreError(f"step {step} is not captured; nearest captured steps: {near} "
                         f"({len(steps)} captured)")

    def _check_hook(self, hook: str) -> int:
        """Width of a hook whose activations are stored (full captures)."""
        if hook not in self.act_hooks:
            extra = (f" ({hook} has statistics only: full captures keep the activations of "
                     f"capture.hooks)") if hook in self.stat_hooks else ""
            raise StoreError(f"hook {hook!r} has no stored activations{extra}; stored: "
                             f"{', '.join(self.act_hooks) or '(none)'}")
        return self.act_hooks[hook]

    def _check_stat_hook(self, hook: str) -> int:
        if hook not in self.hooks:
            raise StoreError(f"hook {hook!r} is not stored; stored hooks: "
                             f"{', '.join(self.hooks) or '(none)'}")
        return self.hooks[hook]

    def _check_seq(self, seq: int, limit: int | None = None, what: str = "sequence") -> int:
        n = self.n_seqs if limit is None else limit
        seq = int(seq)
        if not 0 <= seq < n:
            raise StoreError(f"{what} {seq} is out of range 0..{n - 1}")
        return seq

    def tokens(self, step: int, seq: int | None = None) -> np.ndarray:
        """The token ids the capture at `step` ran on: [P, T], or [T] for one sequence."""
        s = self.slot(step)
        if seq is None:
            return self._read("inputs/tokens", (s,))
        return self._read("inputs/tokens", (s, self._check_seq(seq)))

    def probe_tokens(self) -> np.ndarray | None:
        """The probe set [P, T] (source "probe"), else None."""
        if self.source != "probe":
            return None
        try:
            return self._read("probe/tokens", (slice(None), slice(None)))
        except CorruptStore:
            if self._being_created():
                return None
            raise

    def _being_created(self) -> bool:
        """Whether the writer is still creating the store's arrays: it creates captures/step
        last, so until it exists other arrays may be missing without the store being
        corrupt (a reader then sees an empty store)."""
        try:
            open_array(self._store, "captures/step", "r")
            return False
        except (FileNotFoundError, KeyError):
            return True

    def act_chunks(self, hook: str) -> tuple[int, ...]:
        """The chunk shape of acts/<hook> (export reads one chunk of sequences at a time)."""
        self._check_hook(hook)
        return tuple(self._array(f"acts/{hook}").chunks)

    def activations(self, hook: str, step: int, seq: int | slice | None = None) -> np.ndarray:
        """float16 [T, D] for one sequence, or [n, T, D] for a slice (None: all P), at a
        full capture."""
        self._check_hook(hook)
        s = self.slot(step, "full")
        if seq is None:
            sel: Any = (s,)
        elif isinstance(seq, slice):
            r = range(self.n_seqs)[seq]
            if r.step != 1:
                return np.stack([self._read(f"acts/{hook}", (s, i)) for i in r]) if len(r) \
                    else np.zeros((0, self.seq_len, self.hooks[hook]), np.float16)
            sel = (s, slice(r.start, r.stop))
        else:
            sel = (s, self._check_seq(seq))
        return self._read(f"acts/{hook}", sel)

    def stat(self, hook: str, stat: str, neuron: int | slice | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(committed steps, values): [n] for one neuron, [n, k] for a slice of neurons
        (read as one block, not neuron by neuron), [n, D] for all of them."""
        D = self._check_stat_hook(hook)
        if stat not in STATS:
            raise StoreError(f"unknown statistic {stat!r}; stored: {', '.join(STATS)}")
        steps, slots = self._committed()
        if isinstance(neuron, slice):
            col: Any = slice(*neuron.indices(D))
            width = len(range(D)[col])
        elif neuron is not None:
            col = self._check_seq(neuron, D, "neuron")
        else:
            col, width = slice(None), D
        if not len(steps):
            return steps, np.zeros((0,) if isinstance(col, int) else (0, width), np.float32)
        m = int(slots.max()) + 1  # only the rows up to the last committed slot
        return steps, self._read(f"stats/{hook}/{stat}", (slice(0, m), col))[slots]

    def stats_at(self, hook: str, step: int, neuron: int | None = None
                 ) -> dict[str, np.ndarray]:
        """Every statistic of `hook` at one step: each [D], or a scalar for one neuron (then
        one chunk per statistic is read)."""
        D = self._check_stat_hook(hook)
        col: Any = slice(None) if neuron is None else self._check_seq(neuron, D, "neuron")
        s = self.slot(step)
        return {st: self._read(f"stats/{hook}/{st}", (s, col)) for st in STATS}

    def topk(self, hook: str, step: int, neuron: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, seq, pos) of the neuron's top-k tokens at `step`, largest first."""
        D = self._check_stat_hook(hook)
        neuron = self._check_seq(neuron, D, "neuron")
        s = self.slot(step)
        v = self._read(f"topk/{hook}/value", (s, neuron))
        i = self._read(f"topk/{hook}/index", (s, neuron)).astype(np.int64)
        ok = i >= 0
        v, i = v[ok], i[ok]
        return v, i // self.seq_len, i % self.seq_len

    # ------------------------------------------------------------------ training dynamics

    def _rows(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(committed steps, the committed rows of a rank-0 array [C, ...])."""
        steps, slots = self._committed()
        if not len(steps):
            shape = self._array(path).shape[1:]
            return steps, np.zeros((0, *shape), np.float32)
        m = int(slots.max()) + 1
        return steps, self._read(path, (slice(0, m),))[slots]

    def head_scores(self, score: str) -> tuple[np.ndarray, np.ndarray]:
        """(committed steps, [n, L, H]) of one head score: entropy, prev_token, duplicate
        or induction (see capture/dynamics.py)."""
        if score not in self.head_score_names:
            raise StoreError(f"head score {score!r} is not stored; stored: "
                             f"{', '.join(self.head_score_names) or '(none)'}")
        return self._rows(f"heads/{score}")

    def logit_lens(self) -> tuple[np.ndarray, np.ndarray]:
        """(committed steps, [n, L]): the probe's next-token loss read off each block's
        output through the final LayerNorm and the unembedding."""
        if not self.has_lens:
            raise StoreError("this store keeps no logit lens (captured with "
                             "capture.dynamics=false, or before it existed)")
        return self._rows("lens/loss")

    def repeated_tokens(self) -> np.ndarray | None:
        """The repeated-token probe [R, N] behind the duplicate and induction scores."""
        if not any(x in ("duplicate", "induction") for x in self.head_score_names) \
                and not self.repeat_attn_seqs:
            return None
        return self._read("probe/repeated", (slice(None), slice(None)))

    def neuron_logits(self, layer: int, step: int, neuron: int) -> dict[str, np.ndarray]:
        """Neuron `neuron` of layer `layer`'s MLP at `step`, from the weights: the K tokens
        it most promotes (`top_token`, `top_value`, descending) and suppresses
        (`bottom_token`, `bottom_value`, ascending) through ln_final and the unembedding."""
        if int(layer) not in self.dla_layers:
            raise StoreError(f"no neuron logit effects for layer {layer}; stored layers: "
                             f"{', '.join(map(str, self.dla_layers)) or '(none)'}")
        neuron = self._check_seq(neuron, self.d_mlp, "neuron")
        s = self.slot(step, "full")
        return {f"{end}_{kind}": self._read(f"dla/{int(layer)}/{end}_{kind}", (s, neuron))
                for end in ("top", "bottom") for kind in ("token", "value")}

    def neuron_events(self, hook: str, dead_below: float = DEAD_BELOW,
                      alive_above: float = ALIVE_ABOVE) -> NeuronEvents:
        """Births and deaths of `hook`'s neurons from their stored frac_active (see
        store/dynamics.py for the rule)."""
        steps, frac = self.stat(hook, "frac_active")
        return neuron_events(steps, frac, dead_below, alive_above)

    def phase_change(self, score: str = "induction", threshold: float = 0.5,
                     layers: list[int] | None = None) -> PhaseChange | None:
        """The first capture where a head's score crosses `threshold` (None if none)."""
        steps, s = self.head_scores(score)
        return phase_change(steps, s, threshold, layers)

    def attention(self, layer: int, step: int, seq: int, head: int | None = None) -> np.ndarray:
        """float16 attention pattern [H, Ta, Ta] (query, key; the first Ta = attn_len
        positions), or [Ta, Ta] for one head, at a full capture."""
        if int(layer) not in self.attn_layers:
            raise StoreError(f"attention of layer {layer} is not stored; stored layers: "
                             f"{', '.join(map(str, self.attn_layers)) or '(none)'}")
        seq = self._check_seq(seq, self.attn_seqs, "attention sequence")
        s = self.slot(step, "full")
        if head is None:
            return self._read(f"attn/{int(layer)}", (s, seq))
        return self._read(f"attn/{int(layer)}",
                          (s, seq, self._check_seq(head, self.n_heads, "head")))

    def repeated_attention(self, layer: int, step: int, rseq: int) -> np.ndarray:
        """float16 [H, Na, Na]: the pattern of repeated-token sequence `rseq` (< Ar) at a
        full capture, its rows and columns at `repeated_positions()`. NaN at a full capture
        taken before a resume began keeping it."""
        if not self.repeat_attn_seqs or int(layer) not in self.attn_layers:
            raise StoreError(f"the repeated-token probe's attention of layer {layer} is not "
                             f"in this store")
        rseq = self._check_seq(rseq, self.repeat_attn_seqs, "repeated sequence")
        return self._read(f"attn_repeated/{int(layer)}", (self.slot(step, "full"), rseq))

    def repeated_positions(self) -> np.ndarray:
        """The positions of the repeated-token sequences that `repeated_attention` keeps
        (none when the store keeps no such pattern)."""
        if not self.repeat_attn_seqs:
            return np.zeros(0, np.int64)
        return repeated_positions(self._array("probe/repeated").shape[1], self.repeat_attn_len)

    def metrics(self, split: str = "train") -> dict[str, np.ndarray]:
        """{"step": the steps written so far, name: values}; rows no metric has are dropped."""
        names = self.layout.metrics.get(split)
        if names is None:
            raise StoreError(f"no metrics split {split!r}; stored: "
                             f"{', '.join(self.layout.metrics)}")
        for n in names:  # re-open: the writer grows them as training goes past their end
            self._arrays.pop(f"metrics/{split}/{n}", None)
        try:
            vals = {n: self._read(f"metrics/{split}/{n}", slice(None)) for n in names}
        except CorruptStore:
            if self._being_created():
                vals = {}
            else:
                raise
        S = max((len(v) for v in vals.values()), default=0)  # the arrays grow with the run
        if not vals or S == 0:
            return {"step": np.zeros(0, np.int64), **{n: np.zeros(0, np.float32) for n in names}}
        keep = np.zeros(S, bool)
        for v in vals.values():
            keep[:len(v)] |= ~np.isnan(v)
        vals = {n: np.concatenate([v, np.full(S - len(v), np.nan, v.dtype)])
                for n, v in vals.items()}
        idx = np.nonzero(keep)[0]
        return {"step": idx + 1, **{n: v[idx] for n, v in vals.items()}}

    # ------------------------------------------------------------------ probe loss

    def token_loss(self, step: int, seq: int | None = None) -> np.ndarray:
        """The model's loss on each probe token at `step`: [P, T], or [T] for one
        sequence; position t is -log p(token t | tokens before it), NaN at position 0."""
        if not self.has_token_loss:
            raise StoreError("this store keeps no per-token loss (captured before it existed, "
                             "or with capture.token_loss=false)")
        s = self.slot(step)
        if seq is None:
            return self._read("loss/token", (s,))
        return self._read("loss/token", (s, self._check_seq(seq)))

    def icl(self) -> tuple[np.ndarray, np.ndarray]:
        """(committed steps, in-context-learning score per capture): the probe's mean loss
        late in the context minus early (Olsson et al. 2022; capture/dynamics.py says which
        positions). It falls below zero as the model learns to use its context."""
        if not self.has_token_loss:
            raise StoreError("this store keeps no in-context-learning score (no per-token "
                             "loss)")
        return self._rows("loss/icl")

    # ------------------------------------------------------------------ weight snapshots

    def snapshot_steps(self) -> list[int]:
        """Steps whose model weights the store holds (snapshots/<step>/), ascending."""
        return snapshot_steps(self._store)

    def snapshot_file(self, step: int, name: str = "model.safetensors") -> bytes:
        """One file of the weight snapshot at `step` (model.safetensors, config.json)."""
        return read_snapshot_file(self._store, self.url, int(step), name)

    # ------------------------------------------------------------------ explorer

    def arrays(self, sizes: bool = True) -> list[dict]:
        """Every array: path, shape, dtype, chunks, bytes stored (best effort; None when
        unknown), uncompressed bytes, codecs, who writes it, and a line per axis."""
        out = []
        for spec in self.layout.array_specs():
            try:
                arr = self._array(spec.path)
                shape, dtype, chunks = tuple(arr.shape), str(arr.dtype), tuple(arr.chunks)
                codecs = ["sharding_indexed"] * (arr.shards is not None) + [
                    c.to_dict()["name"] for c in (*arr.filters, arr.serializer,
                                                  *arr.compressors)]  # a shard's inner ones
            except StoreError:
                shape, dtype, chunks, codecs = spec.shape, spec.dtype, spec.chunks, []
            out.append({
                "path": spec.path, "shape": shape, "dtype": dtype, "chunks": chunks,
                "codecs": codecs,
                "bytes_stored": self._stored_bytes(spec.path) if sizes else None,
                "bytes": int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize,
                "meaning": spec.meaning, "written_by": spec.writer,
                "axes": [f"{a}: {AXES[a]}" for a in spec.axes],
            })
        return out

    def _stored_bytes(self, path: str) -> int | None:
        try:
            if isinstance(self._store, LocalStore):
                total = 0
                for dirpath, _, files in os.walk(Path(self._store.root) / path):
                    for f in files:
                        try:
                            total += os.stat(os.path.join(dirpath, f)).st_size
                        except OSError:
                            pass
                return total
            return getsize_prefix(self._store, path)
        except Exception:  # noqa: BLE001 - best effort
            return None

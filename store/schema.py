"""The on-disk format of a run's capture store: its version, its layout and every array in it.

docs/store.md is the human-readable form of this file; tests check one against the other.
This module imports numpy only (no zarr, no torch), so anything may import it cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import StoreError

SCHEMA_VERSION = 1

STATS = ("mean", "std", "min", "max", "frac_active")  # frac_active = fraction of tokens > 0
SOURCES = ("probe", "train")
STATUSES = ("created", "training", "finished", "stopped", "failed")
METRICS = {"train": ("loss", "lr", "grad_norm", "tokens_per_s"),
           "val": ("loss", "hellaswag_acc_norm")}

# Chunking of the arrays only rank 0 writes (see docs/store.md, "Chunking").
STEP_CHUNK = 1024      # captures/{scheduled_step,step}: every reader reads all of it anyway
STATS_CAPTURES = 32    # stats/<hook>/<stat> chunk = (32 captures, 128 neurons): 16 KiB,
STATS_NEURONS = 128    # one neuron over C captures = C/32 chunks, one capture = D/128 chunks
TOPK_NEURONS = 128     # topk/<hook>/*: (1 capture, 128 neurons, k): no chunk spans captures
METRICS_CHUNK = 4096   # metrics/*/*: 16 KiB per chunk; a whole 19k-step run is 5 chunks

# Root attributes the store sets itself (the layout's `attrs` may not use these names).
RESERVED_ATTRS = ("schema_version", "layout", "status", "updated_at", "created_at")

AXES = {
    "capture": "capture slot c; its training step is captures/step[c] (-1: not committed)",
    "rank": "writing rank (the done-flags' width is the world size)",
    "seq": "sequence of the capture's inputs (the probe set, or the train micro-batches)",
    "pos": "token position in the sequence",
    "neuron": "unit of the hook's last dimension",
    "k": "top-k rank (0 = largest activation)",
    "head": "attention head",
    "query": "query position",
    "key": "key position (causal: key <= query)",
    "step": "training step - 1 (index i holds step i + 1)",
}


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: how it is created, who writes it and what it means."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    fill: float | int
    compressed: bool          # zstd level 1 after the bytes codec, or the bytes codec alone
    axes: tuple[str, ...]
    writer: str
    meaning: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _check_name(name: str, what: str) -> None:
    if (not isinstance(name, str) or not name or "/" in name or name.startswith("__")
            or set(name) <= {"."}):
        raise StoreError(f"{what} {name!r} cannot name a zarr node: it must be non-empty, "
                         f"without '/', not start with '__' and not be only dots")


@dataclass
class Layout:
    """Everything needed to preallocate a run's store (slot c <-> scheduled_steps[c])."""

    scheduled_steps: list[int]      # the capture schedule
    n_seqs: int                     # P: sequences per capture
    seq_len: int                    # T
    act_hooks: dict[str, int]       # hook name -> width D (last dim)
    topk: int                       # k
    attn_layers: list[int]          # layers whose attention pattern is stored
    n_heads: int                    # H
    attn_seqs: int                  # A: patterns of the first A sequences of each capture
    max_steps: int                  # length of the metrics arrays
    world: int                      # ranks writing (the done-flags' width)
    source: str                     # "probe" | "train"
    attrs: dict                     # extra JSON attrs for the root group
    probe_tokens: np.ndarray | None = None   # [P, T] int, for source "probe"
    metrics: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in METRICS.items()})

    def __post_init__(self) -> None:
        self.scheduled_steps = [int(s) for s in self.scheduled_steps]
        self.act_hooks = {str(k): int(v) for k, v in self.act_hooks.items()}
        self.attn_layers = [int(x) for x in self.attn_layers]
        for name in ("n_seqs", "seq_len", "topk", "n_heads", "attn_seqs", "max_steps", "world"):
            setattr(self, name, int(getattr(self, name)))
        self.metrics = {str(k): [str(n) for n in v] for k, v in self.metrics.items()}
        self.validate()

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        s = self.scheduled_steps
        if any(b <= a for a, b in zip(s, s[1:])) or (s and s[0] < 0):
            raise StoreError("scheduled_steps must be non-negative and strictly increasing")
        for name in ("n_seqs", "seq_len", "world"):
            if getattr(self, name) < 1:
                raise StoreError(f"layout {name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise StoreError(f"layout max_steps must be >= 0, got {self.max_steps}")
        if not 1 <= self.topk <= self.n_seqs * self.seq_len:
            raise StoreError(f"layout topk must be in 1..P*T ({self.n_seqs * self.seq_len}), "
                             f"got {self.topk}")
        if self.source not in SOURCES:
            raise StoreError(f"layout source must be one of {', '.join(SOURCES)}, "
                             f"got {self.source!r}")
        for hook, d in self.act_hooks.items():
            _check_name(hook, "hook name")
            if d < 1:
                raise StoreError(f"hook {hook} has width {d}; widths must be at least 1")
        if len(set(self.attn_layers)) != len(self.attn_layers) or any(
                x < 0 for x in self.attn_layers):
            raise StoreError(f"attn_layers must be distinct non-negative layer numbers, "
                             f"got {self.attn_layers}")
        if not 0 <= self.attn_seqs <= self.n_seqs:
            raise StoreError(f"attn_seqs must be in 0..n_seqs ({self.n_seqs}), "
                             f"got {self.attn_seqs}")
        if self.attn_layers and self.attn_seqs and self.n_heads < 1:
            raise StoreError(f"n_heads must be at least 1 to store attention, got {self.n_heads}")
        for split, names in self.metrics.items():
            _check_name(split, "metrics split")
            for n in names:
                _check_name(n, "metric name")
        if not isinstance(self.attrs, dict):
            raise StoreError("layout attrs must be a dict")
        clash = sorted(set(self.attrs) & set(RESERVED_ATTRS))
        if clash:
            raise StoreError(f"layout attrs may not use the store's own names: {', '.join(clash)}")
        try:
            json.dumps(self.attrs, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StoreError(f"layout attrs must be plain JSON (no NaN): {e}") from None
        if self.source == "probe":
            if self.probe_tokens is None:
                raise StoreError("source 'probe' needs probe_tokens [P, T]")
        if self.probe_tokens is not None:
            pt = np.asarray(self.probe_tokens)
            if pt.shape != (self.n_seqs, self.seq_len) or not np.issubdtype(pt.dtype, np.integer):
                raise StoreError(f"probe_tokens must be integers of shape "
                                 f"[{self.n_seqs}, {self.seq_len}], got {pt.dtype} {pt.shape}")

    # ------------------------------------------------------------------ derived

    @property
    def n_captures(self) -> int:
        """C: the number of capture slots."""
        return len(self.scheduled_steps)

    @property
    def stored_attn_layers(self) -> list[int]:
        """The layers whose attention has arrays (none when attn_seqs is 0)."""
        return list(self.attn_layers) if self.attn_seqs > 0 else []

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("probe_tokens")
        d.pop("attrs")  # merged into the root attrs instead
        return d

    @classmethod
    def from_json(cls, d: dict, attrs: dict | None = None,
                  probe_tokens: np.ndarray | None = None) -> "Layout":
        """The inverse of to_json; KeyError/TypeError/ValueError/StoreError when malformed."""
        known = {k: d[k] for k in ("scheduled_steps", "n_seqs", "seq_len", "act_hooks", "topk",
                                   "attn_layers", "n_heads", "attn_seqs", "max_steps", "world",
                                   "source")}
        metrics = d.get("metrics", {k: list(v) for k, v in METRICS.items()})
        stand_in = d.get("source") == "probe" and probe_tokens is None
        if stand_in:  # validation wants them; they are in probe/tokens, read when asked
            probe_tokens = np.zeros((int(d["n_seqs"]), int(d["seq_len"])), np.int32)
        lay = cls(**known, attrs=dict(attrs or {}), probe_tokens=probe_tokens, metrics=metrics)
        if stand_in:
            lay.probe_tokens = None
        return lay

    def array_specs(self) -> list[ArraySpec]:
        """Every array of the store, in creation order (captures/step last)."""
        C, P, T, W, k = self.n_captures, self.n_seqs, self.seq_len, self.world, self.topk
        A, H = self.attn_seqs, self.n_heads
        out: list[ArraySpec] = []
        add = out.append
        add(ArraySpec("captures/scheduled_step", (C,), "int64", (STEP_CHUNK,), -1, True,
                      ("capture",), "rank 0, at create and when a resume extends the schedule",
                      "the step each slot is for (the capture schedule)"))
        add(ArraySpec("captures/done", (C, W), "uint8", (1, 1), 0, False, ("capture", "rank"),
                      "each rank its own column, after its part of the capture is written",
                      "1 where that rank's part of the capture is written"))
        if self.source == "probe":
            add(ArraySpec("probe/tokens", (P, T), "int32", (P, T), -1, True, ("seq", "pos"),
                          "rank 0, at create", "the probe set's token ids"))
        add(ArraySpec("inputs/tokens", (C, P, T), "int32", (1, 1, T), -1, True,
                      ("capture", "seq", "pos"), "each rank its own sequences",
                      "the token ids each capture ran on"))
        for hook, D in self.act_hooks.items():
            add(ArraySpec(f"acts/{hook}", (C, P, T, D), "float16", (1, 1, T, D), math.nan,
                          False, ("capture", "seq", "pos", "neuron"),
                          "each rank its own sequences", f"activations of {hook}"))
        for hook, D in self.act_hooks.items():
            dn = min(D, STATS_NEURONS)
            for st in STATS:
                add(ArraySpec(f"stats/{hook}/{st}", (C, D), "float32", (STATS_CAPTURES, dn),
                              math.nan, True, ("capture", "neuron"),
                              "rank 0 (reduced over all ranks)",
                              f"per-neuron {st} of {hook} over the capture's P*T tokens"))
        for hook, D in self.act_hooks.items():
            dn = min(D, TOPK_NEURONS)
            add(ArraySpec(f"topk/{hook}/value", (C, D, k), "float32", (1, dn, k), math.nan,
                          True, ("capture", "neuron", "k"), "rank 0 (reduced over all ranks)",
                          f"each neuron's k largest activations of {hook}, descending"))
            add(ArraySpec(f"topk/{hook}/index", (C, D, k), "int32", (1, dn, k), -1, True,
                          ("capture", "neuron", "k"), "rank 0 (reduced over all ranks)",
                          "where they are: seq * T + pos into inputs/tokens[c] (-1: none)"))
        for layer in self.stored_attn_layers:
            add(ArraySpec(f"attn/{layer}", (C, A, H, T, T), "float16", (1, 1, H, T, T),
                          math.nan, True, ("capture", "seq", "head", "query", "key"),
                          "the rank holding that sequence",
                          f"attention pattern of layer {layer} for the first {A} sequences"))
        for split, names in self.metrics.items():
            for name in names:
                add(ArraySpec(f"metrics/{split}/{name}", (self.max_steps,), "float32",
                              (METRICS_CHUNK,), math.nan, True, ("step",), "rank 0",
                              f"{split} {name} at each step (NaN: not logged)"))
        add(ArraySpec("captures/step", (C,), "int64", (STEP_CHUNK,), -1, True, ("capture",),
                      "rank 0, at commit (after every rank's done flag)",
                      "the committed step of each slot; -1: not visible to readers"))
        return out

    def bytes_per_capture(self) -> int:
        """Uncompressed bytes of one capture, over all arrays with a capture axis."""
        total = 0
        for spec in self.array_specs():
            if spec.axes[0] == "capture":
                per = int(np.prod(spec.shape[1:], dtype=np.int64))
                total += per * np.dtype(spec.dtype).itemsize
        return int(total)

    def bytes_total(self) -> int:
        """Uncompressed bytes of every array of the run's store."""
        return int(sum(spec.nbytes for spec in self.array_specs()))

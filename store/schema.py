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

SCHEMA_VERSION = 2

# Tiers of a capture (captures/tier holds their bits). summary: every capture (statistics,
# top-k, head scores, logit lens, per-token probe loss); full: also the activations, the
# attention patterns and the neuron logit effects, on a sparser schedule.
SUMMARY, FULL = 1, 2
TIERS = {"summary": SUMMARY, "full": FULL}

STATS = ("mean", "std", "min", "max", "frac_active")  # frac_active = fraction of tokens > 0
# Per-head training-dynamics scores (capture/dynamics.py defines them).
HEAD_SCORES = ("entropy", "prev_token", "duplicate", "induction")
REPEAT_SCORES = ("duplicate", "induction")  # these need the repeated-token probe
SOURCES = ("probe", "train")
STATUSES = ("created", "training", "finished", "stopped", "failed")
METRICS = {"train": ("loss", "lr", "grad_norm", "tokens_per_s"),
           "val": ("loss", "hellaswag_acc_norm")}

# Chunking of the arrays only rank 0 writes (see docs/store.md, "Chunking").
STEP_CHUNK = 1024      # captures/{step,tier}: every reader reads all of it anyway
SLOT_BLOCK = 1024      # the capture axis grows by this many slots (one captures/step chunk)
STATS_CAPTURES = 32    # stats/<hook>/<stat> chunk = (32 captures, 128 neurons): 16 KiB,
STATS_NEURONS = 128    # one neuron over C captures = C/32 chunks, one capture = D/128 chunks
TOPK_NEURONS = 128     # topk/<hook>/*: (1 capture, 128 neurons, k): no chunk spans captures
DYN_CAPTURES = 32      # heads/<score>, lens/loss: (32 captures, all layers[, all heads])
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
    "qpos": "query position among the first attn_len",
    "kpos": "key position among the first attn_len (causal: kpos <= qpos)",
    "step": "training step - 1 (index i holds step i + 1)",
    "layer": "transformer block",
    "rseq": "sequence of the repeated-token probe",
    "rpos": "token position in a repeated-token sequence (second half = first half)",
    "rqpos": "query position among the repeated probe's kept ones (repeated_positions)",
    "rkpos": "key position among the repeated probe's kept ones (rkpos <= rqpos: causal)",
}


def repeated_positions(n_tokens: int, kept: int) -> np.ndarray:
    """Which positions of an N-token repeated sequence (N = n_tokens = 2n) its stored
    attention keeps, ascending: all N when kept >= N; else the first kept - (kept - 1) // 2
    of the first half and the first (kept - 1) // 2 of the second. A cut to the first
    positions alone would keep no second half, where the duplicate and induction stripes
    are; this cut keeps, for every kept second-half query n + i, both its earlier
    occurrence i and the token after it, i + 1 (the induction stripe)."""
    N, kept = int(n_tokens), int(kept)
    if kept >= N:
        return np.arange(N)
    second = (kept - 1) // 2
    return np.concatenate([np.arange(kept - second), N // 2 + np.arange(second)])


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
    # When a capture writes it: "summary" (every capture), "full" (full captures only), or
    # "" (not per capture: written once, or per training step).
    tier: str = ""

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
    """Everything needed to create a run's store. Nothing here depends on when captures
    happen: they are appended to the capture axis as they are taken (slot c is the c-th
    capture; its step is captures/step[c])."""

    n_seqs: int                     # P: sequences per capture
    seq_len: int                    # T
    act_hooks: dict[str, int]       # full tier: hook name -> width D of stored activations
    topk: int                       # k
    attn_layers: list[int]          # layers whose attention pattern is stored (full tier)
    n_heads: int                    # H
    attn_seqs: int                  # A: patterns of the first A sequences of each capture
    max_steps: int                  # the metrics arrays' initial length (they grow)
    world: int                      # ranks writing (the done-flags' width)
    source: str                     # "probe" | "train"
    attrs: dict                     # extra JSON attrs for the root group
    probe_tokens: np.ndarray | None = None   # [P, T] int, for source "probe"
    metrics: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in METRICS.items()})
    # summary tier: hook name -> width D of the per-neuron statistics and top-k (None: the
    # same hooks as act_hooks)
    stat_hooks: dict[str, int] | None = None
    attn_len: int = 0                   # query and key positions kept (0: all T)
    token_loss: bool = False            # loss/token and loss/icl (summary tier)
    # Training dynamics (summary tier but dla, which is full tier).
    n_layers: int = 0                   # L: layers of the head scores and the logit lens
    head_scores: list[str] = field(default_factory=list)  # subset of HEAD_SCORES
    logit_lens: bool = False
    repeated_tokens: np.ndarray | None = None  # [R, N] the repeated-token probe (N = 2n)
    dla_layers: list[int] = field(default_factory=list)  # MLP layers with logit effects
    d_mlp: int = 0                      # M
    dla_k: int = 0                      # K: promoted and suppressed tokens kept per neuron
    # full tier: the attention patterns of the first Ar repeated-token sequences (the
    # induction score's probe), at the Na positions repeated_positions(N, Na) keeps; 0: none
    # (and so in stores written before they were kept)
    repeat_attn_seqs: int = 0           # Ar
    repeat_attn_len: int = 0            # Na

    def __post_init__(self) -> None:
        self.act_hooks = {str(k): int(v) for k, v in self.act_hooks.items()}
        if self.stat_hooks is None:
            self.stat_hooks = dict(self.act_hooks)
        self.stat_hooks = {str(k): int(v) for k, v in self.stat_hooks.items()}
        self.attn_layers = [int(x) for x in self.attn_layers]
        for name in ("n_seqs", "seq_len", "topk", "n_heads", "attn_seqs", "max_steps", "world",
                     "attn_len"):
            setattr(self, name, int(getattr(self, name)))
        if self.attn_len <= 0 or self.attn_len > self.seq_len:
            self.attn_len = self.seq_len
        self.metrics = {str(k): [str(n) for n in v] for k, v in self.metrics.items()}
        self.head_scores = [str(x) for x in self.head_scores]
        self.dla_layers = [int(x) for x in self.dla_layers]
        for name in ("n_layers", "d_mlp", "dla_k", "repeat_attn_seqs", "repeat_attn_len"):
            setattr(self, name, int(getattr(self, name)))
        self.logit_lens = bool(self.logit_lens)
        self.token_loss = bool(self.token_loss)
        self.validate()

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
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
        for hooks in (self.act_hooks, self.stat_hooks):
            for hook, d in hooks.items():
                _check_name(hook, "hook name")
                if d < 1:
                    raise StoreError(f"hook {hook} has width {d}; widths must be at least 1")
        clash = [h for h in self.act_hooks if h in self.stat_hooks
                 and self.stat_hooks[h] != self.act_hooks[h]]
        if clash:
            raise StoreError(f"hook {clash[0]} has two widths in the layout")
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
        self._validate_dynamics()
        if self.source == "probe":
            if self.probe_tokens is None:
                raise StoreError("source 'probe' needs probe_tokens [P, T]")
        if self.probe_tokens is not None:
            pt = np.asarray(self.probe_tokens)
            if pt.shape != (self.n_seqs, self.seq_len) or not np.issubdtype(pt.dtype, np.integer):
                raise StoreError(f"probe_tokens must be integers of shape "
                                 f"[{self.n_seqs}, {self.seq_len}], got {pt.dtype} {pt.shape}")

    def _validate_dynamics(self) -> None:
        bad = [x for x in self.head_scores if x not in HEAD_SCORES]
        if bad or len(set(self.head_scores)) != len(self.head_scores):
            raise StoreError(f"head_scores must be distinct names from {', '.join(HEAD_SCORES)}; "
                             f"got {self.head_scores}")
        if (self.head_scores or self.logit_lens) and self.n_layers < 1:
            raise StoreError("n_layers must be at least 1 to store head scores or the logit lens")
        if self.head_scores and self.n_heads < 1:
            raise StoreError(f"n_heads must be at least 1 to store head scores, "
                             f"got {self.n_heads}")
        needs_rep = [x for x in self.head_scores if x in REPEAT_SCORES]
        if needs_rep and self.repeated_tokens is None:
            raise StoreError(f"head scores {', '.join(needs_rep)} need repeated_tokens [R, N]")
        if self.repeated_tokens is not None:
            r = np.asarray(self.repeated_tokens)
            if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 2 or r.shape[1] % 2 or \
                    not np.issubdtype(r.dtype, np.integer):
                raise StoreError(f"repeated_tokens must be integers [R, N] with N even, got "
                                 f"{r.dtype} {r.shape}")
        if self.repeat_attn_seqs:
            r = np.asarray(self.repeated_tokens) if self.repeated_tokens is not None else None
            if r is None or not self.stored_attn_layers or not \
                    1 <= self.repeat_attn_seqs <= r.shape[0] or not 2 <= self.repeat_attn_len \
                    <= r.shape[1]:
                raise StoreError(f"repeat_attn_seqs {self.repeat_attn_seqs} and "
                                 f"repeat_attn_len {self.repeat_attn_len} need stored attention "
                                 f"layers and a repeated-token probe [R, N] with R >= "
                                 f"repeat_attn_seqs and N >= repeat_attn_len >= 2")
        if self.dla_layers:
            if len(set(self.dla_layers)) != len(self.dla_layers) or min(self.dla_layers) < 0:
                raise StoreError(f"dla_layers must be distinct non-negative layer numbers, "
                                 f"got {self.dla_layers}")
            if self.d_mlp < 1 or self.dla_k < 1:
                raise StoreError(f"d_mlp and dla_k must be at least 1 to store neuron logit "
                                 f"effects, got {self.d_mlp} and {self.dla_k}")

    # ------------------------------------------------------------------ derived

    @property
    def stored_attn_layers(self) -> list[int]:
        """The layers whose attention has arrays (none when attn_seqs is 0)."""
        return list(self.attn_layers) if self.attn_seqs > 0 else []

    @property
    def widths(self) -> dict[str, int]:
        """Every hook with any array (activations or statistics) and its width."""
        return {**self.stat_hooks, **self.act_hooks}

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("probe_tokens")
        d.pop("repeated_tokens")  # in probe/repeated
        d.pop("attrs")  # merged into the root attrs instead
        return d

    @classmethod
    def from_json(cls, d: dict, attrs: dict | None = None,
                  probe_tokens: np.ndarray | None = None,
                  repeated_tokens: np.ndarray | None = None) -> "Layout":
        """The inverse of to_json; KeyError/TypeError/ValueError/StoreError when malformed."""
        known = {k: d[k] for k in ("n_seqs", "seq_len", "act_hooks", "topk", "attn_layers",
                                   "n_heads", "attn_seqs", "max_steps", "world", "source")}
        metrics = d.get("metrics", {k: list(v) for k, v in METRICS.items()})
        stand_in = d.get("source") == "probe" and probe_tokens is None
        if stand_in:  # validation wants them; they are in probe/tokens, read when asked
            probe_tokens = np.zeros((int(d["n_seqs"]), int(d["seq_len"])), np.int32)
        opt = {k: d[k] for k in ("stat_hooks", "attn_len", "token_loss", "n_layers",
                                 "head_scores", "logit_lens", "dla_layers", "d_mlp", "dla_k",
                                 "repeat_attn_seqs", "repeat_attn_len")
               if k in d}
        rep_stand_in = (any(x in REPEAT_SCORES for x in opt.get("head_scores", ()))
                        or opt.get("repeat_attn_seqs")) and repeated_tokens is None
        if rep_stand_in:  # likewise: they are in probe/repeated
            na = int(opt.get("repeat_attn_len", 0))
            repeated_tokens = np.zeros((max(1, int(opt.get("repeat_attn_seqs", 0))),
                                        max(2, na + na % 2)), np.int32)
        lay = cls(**known, attrs=dict(attrs or {}), probe_tokens=probe_tokens, metrics=metrics,
                  repeated_tokens=repeated_tokens, **opt)
        if stand_in:
            lay.probe_tokens = None
        if rep_stand_in:
            lay.repeated_tokens = None
        return lay

    def array_specs(self, capacity: int = SLOT_BLOCK) -> list[ArraySpec]:
        """Every array of the store with `capacity` capture slots, in creation order
        (captures/step, the commit record, last)."""
        C, P, T, W, k = capacity, self.n_seqs, self.seq_len, self.world, self.topk
        A, H, Ta = self.attn_seqs, self.n_heads, self.attn_len
        out: list[ArraySpec] = []

        def add(*a, tier: str = "") -> None:
            out.append(ArraySpec(*a, tier=tier))

        add("captures/tier", (C,), "uint8", (STEP_CHUNK,), 0, True, ("capture",),
            "rank 0, at commit (before captures/step)",
            "the tiers of each committed capture: 1 summary, 2 full (bits)", tier="summary")
        add("captures/done", (C, W), "uint8", (1, 1), 0, False, ("capture", "rank"),
            "each rank its own column, after its part of the capture is written",
            "1 where that rank's part of the capture is written", tier="summary")
        if self.source == "probe":
            add("probe/tokens", (P, T), "int32", (P, T), -1, True, ("seq", "pos"),
                "rank 0, at create", "the probe set's token ids")
        add("inputs/tokens", (C, P, T), "int32", (1, 1, T), -1, True,
            ("capture", "seq", "pos"), "each rank its own sequences",
            "the token ids each capture ran on", tier="summary")
        for hook, D in self.act_hooks.items():
            add(f"acts/{hook}", (C, P, T, D), "float16", (1, 1, T, D), math.nan, False,
                ("capture", "seq", "pos", "neuron"), "each rank its own sequences",
                f"activations of {hook}", tier="full")
        for hook, D in self.stat_hooks.items():
            dn = min(D, STATS_NEURONS)
            for st in STATS:
                add(f"stats/{hook}/{st}", (C, D), "float32", (STATS_CAPTURES, dn), math.nan,
                    True, ("capture", "neuron"), "rank 0 (reduced over all ranks)",
                    f"per-neuron {st} of {hook} over the capture's P*T tokens", tier="summary")
        for hook, D in self.stat_hooks.items():
            dn = min(D, TOPK_NEURONS)
            add(f"topk/{hook}/value", (C, D, k), "float32", (1, dn, k), math.nan, True,
                ("capture", "neuron", "k"), "rank 0 (reduced over all ranks)",
                f"each neuron's k largest activations of {hook}, descending", tier="summary")
            add(f"topk/{hook}/index", (C, D, k), "int32", (1, dn, k), -1, True,
                ("capture", "neuron", "k"), "rank 0 (reduced over all ranks)",
                "where they are: seq * T + pos into inputs/tokens[c] (-1: none)",
                tier="summary")
        for layer in self.stored_attn_layers:
            add(f"attn/{layer}", (C, A, H, Ta, Ta), "float16", (1, 1, H, Ta, Ta), math.nan,
                True, ("capture", "seq", "head", "qpos", "kpos"), "the rank holding that sequence",
                f"attention pattern of layer {layer} for the first {A} sequences, the first "
                f"{Ta} query and key positions", tier="full")
        Ar, Na = self.repeat_attn_seqs, self.repeat_attn_len
        for layer in self.stored_attn_layers if Ar else []:
            add(f"attn_repeated/{layer}", (C, Ar, H, Na, Na), "float16", (1, 1, H, Na, Na),
                math.nan, True, ("capture", "rseq", "head", "rqpos", "rkpos"),
                "rank rseq % W", f"attention pattern of layer {layer} on the first {Ar} "
                f"repeated-token sequences, at the {Na} positions repeated_positions keeps",
                tier="full")
        if self.token_loss:
            add("loss/token", (C, P, T), "float32", (1, P, T), math.nan, True,
                ("capture", "seq", "pos"), "rank 0 (gathered from all ranks)",
                "the model's loss on each probe token given the ones before it (NaN at "
                "position 0)", tier="summary")
            add("loss/icl", (C,), "float32", (STEP_CHUNK,), math.nan, True, ("capture",),
                "rank 0", "in-context-learning score: mean loss late in the context minus "
                "early (negative: later tokens are predicted better)", tier="summary")
        out += self._dynamics_specs(C)
        for split, names in self.metrics.items():
            for name in names:
                add(f"metrics/{split}/{name}", (self.max_steps,), "float32", (METRICS_CHUNK,),
                    math.nan, True, ("step",), "rank 0 (grown as training goes past its end)",
                    f"{split} {name} at each step (NaN: not logged)")
        add("captures/step", (C,), "int64", (STEP_CHUNK,), -1, True, ("capture",),
            "rank 0, at commit (after every rank's done flag)",
            "the committed step of each slot; -1: not visible to readers", tier="summary")
        return out

    def _dynamics_specs(self, C: int) -> list[ArraySpec]:
        L, H, M, K = self.n_layers, self.n_heads, self.d_mlp, self.dla_k
        out: list[ArraySpec] = []

        def add(*a, tier: str = "") -> None:
            out.append(ArraySpec(*a, tier=tier))

        if self.repeated_tokens is not None:
            R, N = np.asarray(self.repeated_tokens).shape
            add("probe/repeated", (R, N), "int32", (R, N), -1, True, ("rseq", "rpos"),
                "rank 0, at create",
                "the repeated-token probe: N/2 random tokens, then the same again")
        for score in self.head_scores:
            add(f"heads/{score}", (C, L, H), "float32", (DYN_CAPTURES, L, H), math.nan, True,
                ("capture", "layer", "head"), "rank 0 (reduced over all ranks)",
                f"each head's {score} score (capture/dynamics.py)", tier="summary")
        if self.logit_lens:
            add("lens/loss", (C, L), "float32", (DYN_CAPTURES, L), math.nan, True,
                ("capture", "layer"), "rank 0 (reduced over all ranks)",
                "logit lens: next-token loss on the probe of each block's output "
                "through the final LayerNorm and the unembedding", tier="summary")
        # One chunk per layer and capture (GPT-2 124M: 3072 x 10 x 4 B = 120 KiB): the page
        # reads one neuron at one step, and 128-neuron chunks would make every capture
        # write 24 files per array per layer (1,152 for GPT-2's 12 layers).
        for layer in self.dla_layers:
            for end, order in (("top", "most promoted, descending"),
                               ("bottom", "most suppressed, ascending")):
                add(f"dla/{layer}/{end}_token", (C, M, K), "int32", (1, M, K), -1, True,
                    ("capture", "neuron", "k"), "rank layer % W",
                    f"the K tokens each neuron of layer {layer}'s MLP {order} "
                    f"directly (W_out through ln_final and W_U)", tier="full")
                add(f"dla/{layer}/{end}_value", (C, M, K), "float32", (1, M, K), math.nan,
                    True, ("capture", "neuron", "k"), "rank layer % W",
                    "their direct logit effects per unit of activation", tier="full")
        return out

    def bytes_per_capture(self, tier: str = "summary") -> int:
        """Uncompressed bytes one capture of `tier` adds: "summary" (what every capture
        writes) or "full" (what a full capture writes on top of its summary)."""
        if tier not in TIERS:
            raise StoreError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        total = 0
        for spec in self.array_specs(1):
            if spec.tier == tier:
                total += spec.nbytes
        return int(total)

    def bytes_fixed(self, max_steps: int | None = None) -> int:
        """Uncompressed bytes written once per run (the probes) or per training step (the
        metrics, for `max_steps` steps)."""
        S = self.max_steps if max_steps is None else int(max_steps)
        total = 0
        for spec in self.array_specs(1):
            if spec.tier:
                continue
            if spec.axes == ("step",):
                total += S * np.dtype(spec.dtype).itemsize
            else:
                total += spec.nbytes
        return int(total)

"""What a run's capture takes, resolved once from its CaptureConfig, the model's shape and
hook names, and the world size: the hooks of each tier with their widths, the attention
layers, the dynamics; and the store layout it writes. Needs no weights and no data, so the
plan (`--plan`) and the checks run before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from capture.config import CaptureConfig, CaptureConfigError
from capture.hooks import hook_width, parse_layers, resolve_hooks
from store.schema import Layout


class ModelDims(Protocol):
    """The model's shape as capture needs it (the trainer's ModelConfig is one)."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    attn_only: bool
    tie_embeddings: bool

    def num_params(self) -> int: ...


@dataclass
class CaptureSpec:
    act_hooks: dict[str, int]       # full tier: activations kept
    stat_hooks: dict[str, int]      # summary tier: statistics and top-k (includes act_hooks)
    attn_layers: list[int]
    n_seqs: int                     # P
    seq_len: int                    # T
    n_layers: int
    n_heads: int
    d_mlp: int
    head_scores: list[str] = field(default_factory=list)
    repeat_half: int = 0            # n of the repeated-token probe (0: none)
    dla_layers: list[int] = field(default_factory=list)
    dla_k: int = 0

    @property
    def dynamics(self) -> bool:
        return bool(self.head_scores)


def resolve(c: CaptureConfig, dims: ModelDims, hook_names: list[str], world: int,
            seq_len: int, micro_batch: int) -> CaptureSpec:
    """Checks every capture setting against the model; CaptureConfigError (one line) when
    one cannot work."""
    c.validate(dims.block_size, world)
    acts = resolve_hooks(c.hooks, hook_names, dims.n_layer)
    summary = resolve_hooks(_available(c.summary_hooks, hook_names), hook_names,
                            dims.n_layer) if c.summary_hooks.strip() else []
    stat = [h for h in hook_names if h in set(acts) | set(summary)]  # the model's order
    widths = {h: hook_width(h, dims.n_embd) for h in stat}
    layers = parse_layers(c.attn_layers, dims.n_layer)
    if c.source == "probe":
        P, T = c.probe_seqs, c.probe_len or seq_len
    else:
        P, T = micro_batch * world, seq_len
    spec = CaptureSpec(act_hooks={h: widths[h] for h in acts}, stat_hooks=widths,
                       attn_layers=layers, n_seqs=P, seq_len=T, n_layers=dims.n_layer,
                       n_heads=dims.n_head, d_mlp=4 * dims.n_embd)
    if c.dynamics:
        spec.head_scores = ["entropy", "prev_token"]
        half = c.repeat_half or T // 2
        if c.repeat_seqs and half:
            spec.head_scores += ["duplicate", "induction"]
            spec.repeat_half = half
        if not dims.attn_only and c.dla_topk and c.full_every:
            spec.dla_layers = list(range(dims.n_layer))
            spec.dla_k = min(c.dla_topk, dims.vocab_size)
    return spec


def _available(spec: str, names: list[str]) -> str:
    """summary_hooks' patterns that this model has (an attention-only model has no MLP
    neurons: its default summary is the residual stream alone)."""
    import fnmatch
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    kept = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
    if not kept:
        raise CaptureConfigError(f"capture.summary_hooks {spec!r} matches no hook of this "
                                 f"model")
    return ",".join(kept)


def build_layout(spec: CaptureSpec, c: CaptureConfig, world: int, max_steps: int,
                 attrs: dict, probe_tokens: np.ndarray | None,
                 repeated_tokens: np.ndarray | None) -> Layout:
    """The store layout of this capture (probe tokens may be stand-ins for a plan)."""
    P = spec.n_seqs
    attn_seqs = min(c.attn_seqs, P) if spec.attn_layers else 0
    attn_seqs = attn_seqs if c.full_every else 0
    attn_len = min(c.attn_len or spec.seq_len, spec.seq_len)
    # The repeated probe's patterns go with the natural ones: as many sequences (of R) and
    # as many positions (of N): the attention a full capture keeps at most doubles.
    rep_seqs = rep_len = 0
    if spec.repeat_half and repeated_tokens is not None and attn_seqs:
        rep_seqs = min(attn_seqs, len(repeated_tokens))
        rep_len = min(attn_len, 2 * spec.repeat_half)
    return Layout(
        n_seqs=P, seq_len=spec.seq_len, act_hooks=spec.act_hooks, stat_hooks=spec.stat_hooks,
        topk=min(c.topk, P * spec.seq_len), attn_layers=spec.attn_layers,
        n_heads=spec.n_heads, attn_seqs=attn_seqs, attn_len=attn_len, max_steps=max_steps,
        world=world, source=c.source, attrs=attrs, probe_tokens=probe_tokens,
        token_loss=c.token_loss, n_layers=spec.n_layers if spec.dynamics else 0,
        head_scores=spec.head_scores, logit_lens=spec.dynamics,
        repeated_tokens=repeated_tokens if spec.repeat_half else None,
        dla_layers=spec.dla_layers, d_mlp=spec.d_mlp if spec.dla_layers else 0,
        dla_k=spec.dla_k, repeat_attn_seqs=rep_seqs, repeat_attn_len=rep_len)

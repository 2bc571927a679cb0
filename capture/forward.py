"""One capture's forward: a rank's slice of the probe set (or of the live batch) through the
model in batches of about `capture.batch_tokens` tokens, with hooks attached from outside
the model that reduce what they see as it passes:

- per-neuron sums, extremes and top-k of every statistics hook (float64 sums);
- at full captures, the activations of the kept hooks (float16, to host memory) and the
  first attn_len x attn_len of the stored sequences' attention patterns;
- the attention entropy and previous-token score of every head;
- the logit lens on `lens_tokens` evenly spaced tokens, and the per-token loss of the
  final layer on every token (the unembedding in chunks of rows, never whole).

Nothing of size [batch, heads, T, T] or [tokens, vocab] outlives its batch, so memory
stays bounded at long contexts. `reduce` then combines the ranks (collectives every rank
must reach, in the same order everywhere). No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from capture import dynamics
from capture._dist import DistLike, all_gather_cat, all_reduce_sum, full_tensor
from capture.spec import CaptureSpec

LOSS_CHUNK = 1024  # rows of logits at a time: 1024 x 50257 fp32 = 206 MB


class _Stats:
    """Running per-neuron statistics of one hook over this rank's tokens."""

    def __init__(self, D: int, k: int, device: torch.device):
        self.sums = torch.zeros(4, D, dtype=torch.float64, device=device)
        self.lo = torch.full((D,), float("inf"), device=device)
        self.hi = torch.full((D,), float("-inf"), device=device)
        self.k = k
        self.tv: torch.Tensor | None = None  # [k', D] top values so far
        self.ti: torch.Tensor | None = None  # their flat token index into the capture

    def add(self, a: torch.Tensor, first_row: int) -> None:
        flat = a.reshape(-1, a.shape[-1]).float()
        self.sums[0] += flat.sum(0, dtype=torch.float64)
        self.sums[1] += flat.double().square().sum(0)
        self.sums[2] += (flat > 0).sum(0, dtype=torch.float64)
        self.sums[3] += flat.shape[0]
        self.lo = torch.minimum(self.lo, flat.amin(0))
        self.hi = torch.maximum(self.hi, flat.amax(0))
        v, i = flat.topk(min(self.k, flat.shape[0]), dim=0)
        i = i + first_row
        if self.tv is not None:
            v, i = torch.cat([self.tv, v]), torch.cat([self.ti, i])
            v, sel = v.topk(min(self.k, v.shape[0]), dim=0)
            i = i.gather(0, sel)
        self.tv, self.ti = v, i

    def reduce(self, info: DistLike) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Over every rank: three all-reduces and two all-gathers."""
        if info.distributed:
            import torch.distributed as dist
            dist.all_reduce(self.sums)
            dist.all_reduce(self.lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(self.hi, op=dist.ReduceOp.MAX)
        total, sq, active, count = self.sums
        mean = total / count
        std = (sq / count - mean.square()).clamp_min(0).sqrt()  # population std over tokens
        stats = {"mean": mean, "std": std, "min": self.lo, "max": self.hi,
                 "frac_active": active / count}
        v, i = all_gather_cat(self.tv, info), all_gather_cat(self.ti, info)
        v, sel = v.topk(min(self.k, v.shape[0]), dim=0)
        i = i.gather(0, sel)
        return ({n: x.float().cpu().numpy() for n, x in stats.items()},
                v.t().contiguous().cpu().numpy(), i.t().contiguous().to(torch.int32).cpu().numpy())


@dataclass
class ForwardResult:
    """What one rank took at a capture (host tensors, or device ones reduced later)."""

    acts: dict[str, torch.Tensor] = field(default_factory=dict)   # [n, T, D] float16
    attn: dict[int, torch.Tensor] = field(default_factory=dict)   # [a, H, Ta, Ta] float16
    stats: dict[str, _Stats] = field(default_factory=dict)
    natural: torch.Tensor | None = None      # [L, 2, H] sums of entropy, prev_token
    lens: torch.Tensor | None = None         # [L, 2] sums of loss, count
    token_loss: torch.Tensor | None = None   # [n, T] (NaN at position 0)


class CaptureForward:
    """Runs one capture's forward on this rank. `seq_start`: the capture-wide index of the
    first of `tokens`' sequences; `full`: also keep activations and patterns."""

    def __init__(self, spec: CaptureSpec, k: int, attn_seqs: int, attn_len: int,
                 lens_tokens: int, batch_tokens: int, token_loss: bool):
        self.spec, self.k, self.attn_seqs, self.attn_len = spec, k, attn_seqs, attn_len
        self.lens_tokens, self.batch_tokens, self.want_loss = lens_tokens, batch_tokens, \
            token_loss

    @torch.no_grad()
    def run(self, model, tokens: torch.Tensor, seq_start: int, full: bool,
            unembed: tuple | None) -> ForwardResult:
        """`unembed`: (W_U, ln_final) gathered by the caller (collectives), or None when
        neither the lens nor the token loss is wanted."""
        spec, dev = self.spec, tokens.device
        n, T = tokens.shape
        out = ForwardResult()
        out.stats = {h: _Stats(D, self.k, dev) for h, D in spec.stat_hooks.items()}
        L, H = spec.n_layers, spec.n_heads
        if spec.dynamics:
            out.natural = torch.zeros(L, 2, H, dtype=torch.float64, device=dev)
            out.lens = torch.zeros(L, 2, dtype=torch.float64, device=dev)
        if unembed is not None and self.want_loss:
            out.token_loss = torch.full((n, T), float("nan"), device=dev)
        keep_attn = [lay for lay in spec.attn_layers] if full else []
        a_here = max(0, min(n, self.attn_seqs - seq_start)) if keep_attn else 0
        Ta = self.attn_len
        if full:
            out.acts = {h: _host((n, T, D), torch.float16, dev) for h, D in spec.act_hooks.items()}
            if a_here:
                out.attn = {lay: _host((a_here, H, Ta, Ta), torch.float16, dev)
                            for lay in keep_attn}
        lens_rows = _lens_rows(n, T, self.lens_tokens, dev)
        b = max(1, self.batch_tokens // T)
        for off in range(0, n, b):
            x = tokens[off:off + b]
            hooks = self._hooks(out, off, x, seq_start, full, keep_attn, a_here, unembed,
                                lens_rows)
            with model.hooks(fwd_hooks=hooks):
                model(x, return_type=None)
        return out

    def _hooks(self, out: ForwardResult, off: int, x: torch.Tensor, seq_start: int,
               full: bool, keep_attn: list[int], a_here: int, unembed, lens_rows):
        spec, T = self.spec, x.shape[1]
        b = x.shape[0]
        hooks = []

        def stat(name: str):
            def hook(a, hook):
                a = a.reshape(b, T, -1)
                out.stats[name].add(a, (seq_start + off) * T)
                if full and name in out.acts:
                    _copy(out.acts[name][off:off + b], a)
            return hook
        hooks += [(h, stat(h)) for h in spec.stat_hooks]

        def pattern(layer: int):
            def hook(p, hook):
                if out.natural is not None:
                    s = dynamics.head_scores(p, None, 0)
                    out.natural[layer, 0] += s["entropy"].double() * b
                    out.natural[layer, 1] += s["prev_token"].double() * b
                keep = max(0, min(b, a_here - off))
                if keep and layer in out.attn:
                    Ta = self.attn_len
                    _copy(out.attn[layer][off:off + keep], p[:keep, :, :Ta, :Ta])
            return hook
        layers = sorted(set(range(spec.n_layers) if out.natural is not None else [])
                        | set(keep_attn if a_here > off else []))
        hooks += [(f"blocks.{i}.attn.hook_pattern", pattern(i)) for i in layers]

        if unembed is not None:
            W_U, ln = unembed
            rows = lens_rows[(lens_rows >= off * (T - 1)) & (lens_rows < (off + b) * (T - 1))] \
                - off * (T - 1)
            targets = x[:, 1:].reshape(-1)

            def resid(layer: int):
                def hook(r, hook):
                    h = r[:, :-1].reshape(-1, r.shape[-1])
                    last = layer == spec.n_layers - 1
                    if last and out.token_loss is not None:
                        per = _token_ce(h, ln, W_U, targets)  # every token
                        out.token_loss[off:off + b, 1:] = per.view(b, T - 1)
                        sub = per[rows]
                    elif out.lens is not None and len(rows):
                        sub = _token_ce(h[rows], ln, W_U, targets[rows])
                    else:
                        return
                    if out.lens is not None:
                        out.lens[layer, 0] += sub.double().sum()
                        out.lens[layer, 1] += sub.numel()
                return hook
            layers = range(spec.n_layers) if out.lens is not None else [spec.n_layers - 1]
            hooks += [(f"blocks.{i}.hook_resid_post", resid(i)) for i in layers]
        return hooks


def _lens_rows(n: int, T: int, want: int, dev) -> torch.Tensor:
    """Evenly spaced indices into this rank's n x (T-1) predicted tokens."""
    total = n * (T - 1)
    if total <= 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    if want <= 0 or want >= total:
        return torch.arange(total, device=dev)
    return torch.linspace(0, total - 1, want, device=dev).round().long().unique()


def _token_ce(h: torch.Tensor, ln, W_U: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row next-token cross-entropy of residuals h [rows, d] through the final
    LayerNorm and W_U, in float32, LOSS_CHUNK rows of logits at a time."""
    out = []
    for s in range(0, h.shape[0], LOSS_CHUNK):
        z = ln(h[s:s + LOSS_CHUNK]).float() @ W_U.t().float()
        out.append(F.cross_entropy(z, targets[s:s + LOSS_CHUNK], reduction="none"))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def _host(shape, dtype, dev) -> torch.Tensor:
    """Host memory for what a capture keeps: pinned on CUDA (asynchronous copies)."""
    return torch.empty(shape, dtype=dtype, pin_memory=dev.type == "cuda")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    # non_blocking from CUDA into pinned memory: done when the writer's `ready` event fires
    dst.copy_(src.reshape(dst.shape).to(dst.dtype), non_blocking=src.device.type == "cuda")


def reduce_dynamics(res: ForwardResult, n_seqs: int, info: DistLike
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Over every rank (one all-reduce of the sums): ({"entropy", "prev_token"}: [L, H]
    means over all `n_seqs` sequences, the logit lens [L]: mean loss over its tokens)."""
    nat, lens = res.natural, res.lens
    packed = all_reduce_sum(torch.cat([nat.flatten(), lens.flatten()]), info).cpu()
    nat = packed[:nat.numel()].view(nat.shape) / n_seqs
    lens = packed[nat.numel():].view(lens.shape)
    return ({"entropy": nat[:, 0].float(), "prev_token": nat[:, 1].float()},
            (lens[:, 0] / lens[:, 1]).float())


def gather_weights(model) -> tuple[torch.Tensor, torch.nn.Module]:
    """(W_U, the final LayerNorm as a function of float32 input) with whole parameters:
    all-gathers under FSDP, collectives every rank must reach."""
    W_U = full_tensor(model.lm_head.weight)
    ln = model.ln_final
    w, bias, eps = full_tensor(ln.weight).float(), ln.bias, ln.eps
    bias = full_tensor(bias).float() if bias is not None else None

    def ln_fn(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], w, bias, eps)
    return W_U, ln_fn

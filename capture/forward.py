"""One capture's forward: a rank's slice of the probe set (or of the live batch) through the
model in batches of about `capture.batch_tokens` tokens, with hooks attached from outside
the model that reduce what they see as it passes:

- per-neuron sums, extremes and top-k of every statistics hook (float64 sums);
- at full captures, the activations of the kept hooks (float16, to host memory) and the
  first attn_len x attn_len of the stored sequences' attention patterns, and this rank's
  share of the repeated-token probe's patterns (store.schema.repeated_positions);
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
from capture.collectives import DistLike, all_gather_cat, all_reduce_sum, full_tensor, reshard
from capture.spec import CaptureSpec
from store.schema import repeated_positions

LOSS_CHUNK = 64  # rows of logits at a time: 64 x 50257 fp32 = 13 MB, near the cache


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


@dataclass
class ForwardResult:
    """What one rank took at a capture (host tensors, or device ones reduced later)."""

    acts: dict[str, torch.Tensor] = field(default_factory=dict)   # [n, T, D] float16
    attn: dict[int, torch.Tensor] = field(default_factory=dict)   # [a, H, Ta, Ta] float16
    stats: dict[str, _Stats] = field(default_factory=dict)
    natural: torch.Tensor | None = None      # [L, 2, H] sums of entropy, prev_token
    lens: torch.Tensor | None = None         # [L, 2] sums of loss, count
    token_loss: torch.Tensor | None = None   # [n, T] (NaN at position 0)
    repeated: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer ->
    # [len(rep_mine), H, Na, Na] float16: this rank's repeated sequences' kept patterns
    rep_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    dla: dict[int, tuple] = field(default_factory=dict)  # this rank's layers' logit effects


def live_weight(p: torch.Tensor) -> torch.Tensor:
    """A parameter as the forward sees it. Inside a forward under FSDP2 the module's
    parameters are the unsharded tensors already gathered for that forward (the root's
    -- embeddings, final LayerNorm, unembedding -- for the whole forward, a block's during
    its own), so hooks read them at no cost; a sharded one is all-gathered (a collective,
    reached by every rank in the same order since hooks run in the same order)."""
    from torch.distributed.tensor import DTensor
    return p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()


class CaptureForward:
    """Runs one capture's forward on this rank. `seq_start`: the capture-wide index of the
    first of `tokens`' sequences; `full`: also keep activations, patterns, logit effects."""

    def __init__(self, spec: CaptureSpec, k: int, attn_seqs: int, attn_len: int,
                 lens_tokens: int, batch_tokens: int, token_loss: bool, rank: int = 0,
                 world: int = 1, rep_attn_seqs: int = 0, rep_attn_len: int = 0):
        self.spec, self.k, self.attn_seqs, self.attn_len = spec, k, attn_seqs, attn_len
        self.lens_tokens, self.batch_tokens, self.want_loss = lens_tokens, batch_tokens, \
            token_loss
        self.rank, self.world = rank, world
        # Every rank runs the whole repeated probe; each keeps the patterns of the sequences
        # r = rank, rank + world, ... (< rep_attn_seqs) and writes those: one writer a chunk.
        self.rep_mine = list(range(rank, rep_attn_seqs, world))
        self.rep_pos = repeated_positions(2 * spec.repeat_half, rep_attn_len) \
            if self.rep_mine else None

    @torch.no_grad()
    def run(self, model, tokens: torch.Tensor, seq_start: int, full: bool,
            repeated: torch.Tensor | None = None) -> ForwardResult:
        """`repeated`: the repeated-token probe [R, 2n], run in the first batch when its
        length is T (the caller runs it on its own otherwise: `run_repeated`)."""
        spec, dev = self.spec, tokens.device
        n, T = tokens.shape
        out = ForwardResult()
        out.stats = {h: _Stats(D, self.k, dev) for h, D in spec.stat_hooks.items()}
        L, H = spec.n_layers, spec.n_heads
        if spec.dynamics:
            out.natural = torch.zeros(L, 2, H, dtype=torch.float64, device=dev)
            out.lens = torch.zeros(L, 2, dtype=torch.float64, device=dev)
        if self.want_loss:
            out.token_loss = torch.full((n, T), float("nan"), device=dev)
        keep_attn = list(spec.attn_layers) if full else []
        a_here = max(0, min(n, self.attn_seqs - seq_start)) if keep_attn else 0
        Ta = self.attn_len
        if full:
            out.acts = {h: _host((n, T, D), torch.float16, dev) for h, D in spec.act_hooks.items()}
            if a_here:
                out.attn = {lay: _host((a_here, H, Ta, Ta), torch.float16, dev)
                            for lay in keep_attn}
        if full and keep_attn and self.rep_mine and repeated is not None:
            shape = (len(self.rep_mine), H, len(self.rep_pos), len(self.rep_pos))
            out.rep_attn = {lay: _host(shape, torch.float16, dev) for lay in keep_attn}
        lens_rows = _lens_rows(n, T, self.lens_tokens, dev)
        b = max(1, self.batch_tokens // T)
        for off in range(0, n, b):
            x = tokens[off:off + b]
            first = off == 0
            rep = repeated if first and repeated is not None and repeated.shape[1] == T \
                else None
            hooks = self._hooks(model, out, off, x.shape[0], x, seq_start, keep_attn, a_here,
                                lens_rows, rep is not None)
            batch = x if rep is None else torch.cat([x, rep.to(x.device)])
            with model.hooks(fwd_hooks=hooks):
                model(batch, return_type=None)
        if full and spec.dla_layers:
            out.dla = self.logit_effects(model, dev)
        return out

    @torch.no_grad()
    def logit_effects(self, model, dev: torch.device) -> dict[int, tuple]:
        """Each MLP neuron's direct logit effects, from the fp32 weights (never the bf16 copies
        a bf16 policy gathers for the forward), computed on `dev` (with CPU offload the
        shards are in host memory). This rank's layers (layer % world == rank); every rank
        gathers every layer's W_out (a collective each, in layer order)."""
        reshard(model)
        W_U = full_tensor(model.lm_head.weight).to(dev)  # collective
        ln_w = full_tensor(model.ln_final.weight).to(dev, torch.float32)  # collective
        out = {}
        for layer in self.spec.dla_layers:
            # collective; [d, d_mlp]
            W_out = full_tensor(model.blocks[layer].mlp.c_proj.weight).to(dev)
            if layer % self.world == self.rank:
                tv, ti, bv, bi = dynamics.neuron_logit_effects(W_out.t(), ln_w, W_U,
                                                               self.spec.dla_k)
                out[layer] = (ti.to(torch.int32).cpu().numpy(), tv.cpu().numpy(),
                              bi.to(torch.int32).cpu().numpy(), bv.cpu().numpy())
            del W_out
        return out

    def _hooks(self, model, out: ForwardResult, off: int, b: int, x: torch.Tensor,
               seq_start: int, keep_attn: list[int], a_here: int, lens_rows,
               with_repeated: bool):
        """The hooks of one batch: rows :b are the probe's, rows b: the repeated probe."""
        spec, T = self.spec, x.shape[1]
        hooks = []
        live: dict[str, object] = {}

        def unembed():
            """(W_U, the final LayerNorm in float32) from the live root parameters."""
            if "W_U" not in live:
                ln = model.ln_final
                w = live_weight(ln.weight).float()
                bias = live_weight(ln.bias).float() if ln.bias is not None else None
                live["W_U"] = live_weight(model.lm_head.weight)
                live["ln"] = lambda h: F.layer_norm(h.float(), h.shape[-1:], w, bias, ln.eps)
            return live["W_U"], live["ln"]

        def stat(name: str):
            def hook(a, hook):
                a = a[:b].reshape(b, T, -1)
                out.stats[name].add(a, (seq_start + off) * T)
                if name in out.acts:
                    _copy(out.acts[name][off:off + b], a)
            return hook
        hooks += [(h, stat(h)) for h in spec.stat_hooks]

        def pattern(layer: int):
            def hook(p, hook):
                if out.natural is not None:
                    s = dynamics.head_scores(p[:b], None, 0)
                    out.natural[layer, 0] += s["entropy"].double() * b
                    out.natural[layer, 1] += s["prev_token"].double() * b
                if with_repeated:
                    out.repeated[layer] = dynamics.head_scores(None, p[b:], spec.repeat_half)
                    self._keep_repeated(out, layer, p[b:])
                keep = max(0, min(b, a_here - off))
                if keep and layer in out.attn:
                    Ta = self.attn_len
                    _copy(out.attn[layer][off:off + keep], p[:keep, :, :Ta, :Ta])
            return hook
        layers = sorted(set(range(spec.n_layers) if out.natural is not None or with_repeated
                            else []) | set(keep_attn if a_here > off else []))
        hooks += [(f"blocks.{i}.attn.hook_pattern", pattern(i)) for i in layers]

        if out.lens is not None or out.token_loss is not None:
            rows = lens_rows[(lens_rows >= off * (T - 1)) & (lens_rows < (off + b) * (T - 1))] \
                - off * (T - 1)
            targets = x[:, 1:].reshape(-1)

            def resid(layer: int):
                def hook(r, hook):
                    W_U, ln = unembed()
                    h = r[:b, :-1].reshape(-1, r.shape[-1])
                    last = layer == spec.n_layers - 1
                    if last and out.token_loss is not None:
                        per = token_losses(h, ln, W_U, targets)  # every token
                        out.token_loss[off:off + b, 1:] = per.view(b, T - 1)
                        sub = per[rows]
                    elif out.lens is not None and len(rows):
                        sub = token_losses(h[rows], ln, W_U, targets[rows])
                    else:
                        return
                    if out.lens is not None:
                        out.lens[layer, 0] += sub.double().sum()
                        out.lens[layer, 1] += sub.numel()
                return hook
            layers = range(spec.n_layers) if out.lens is not None else [spec.n_layers - 1]
            hooks += [(f"blocks.{i}.hook_resid_post", resid(i)) for i in layers]

        return hooks

    def _keep_repeated(self, out: ForwardResult, layer: int, p: torch.Tensor) -> None:
        """This rank's repeated sequences' pattern [R, H, N, N] -> out.rep_attn[layer], at
        the kept positions (full captures of stored layers only)."""
        dst = out.rep_attn.get(layer)
        if dst is not None:
            mine = torch.tensor(self.rep_mine, device=p.device)
            pos = torch.from_numpy(self.rep_pos).to(p.device)
            _copy(dst, p.index_select(0, mine).index_select(2, pos).index_select(3, pos))

    @torch.no_grad()
    def run_repeated(self, model, repeated: torch.Tensor, res: ForwardResult | None = None
                     ) -> dict[int, dict]:
        """Duplicate-token and induction scores of every layer on the repeated probe, in a
        forward of its own (the same R sequences on every rank: no reduction needed); the
        patterns `res.rep_attn` asks for are kept into it."""
        out: dict[int, dict] = {}

        def pattern(i: int):
            def hook(p, hook):
                out[i] = dynamics.head_scores(None, p, self.spec.repeat_half)
                if res is not None:
                    self._keep_repeated(res, i, p)
            return hook
        with model.hooks(fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", pattern(i))
                                    for i in range(self.spec.n_layers)]):
            model(repeated, return_type=None)
        return out


def reduce_stats(res: ForwardResult, names: list[str], info: DistLike
                 ) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Every hook's statistics over every rank, packed side by side: three all-reduces and
    two all-gathers in all (not five per hook), in the same order on every rank, then seven
    device-to-host copies in all (each a sync point on CUDA), sliced per hook on the host."""
    st = [res.stats[n] for n in names]
    if not st:
        return {}
    widths = [s.lo.numel() for s in st]
    sums = torch.cat([s.sums for s in st], dim=1)
    lo = torch.cat([s.lo for s in st])
    hi = torch.cat([s.hi for s in st])
    kk = min(s.tv.shape[0] for s in st)
    tv = torch.cat([s.tv[:kk] for s in st], dim=1)
    ti = torch.cat([s.ti[:kk] for s in st], dim=1)
    if info.distributed:
        import torch.distributed as dist
        dist.all_reduce(sums)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    tv, ti = all_gather_cat(tv, info), all_gather_cat(ti, info)
    total, sq, active, count = sums
    mean = total / count
    packed = {"mean": mean,
              "std": (sq / count - mean.square()).clamp_min(0).sqrt(),  # population std
              "min": lo, "max": hi, "frac_active": active / count}
    packed = {k: x.float().cpu().numpy() for k, x in packed.items()}
    v, sel = tv.topk(min(st[0].k, tv.shape[0]), dim=0)  # per column: per neuron
    top_v = v.t().contiguous().cpu().numpy()
    top_i = ti.gather(0, sel).t().contiguous().to(torch.int32).cpu().numpy()
    out, c = {}, 0
    for name, D in zip(names, widths):
        out[name] = ({k: x[c:c + D] for k, x in packed.items()}, top_v[c:c + D],
                     top_i[c:c + D])
        c += D
    return out


def _lens_rows(n: int, T: int, want: int, dev) -> torch.Tensor:
    """Evenly spaced indices into this rank's n x (T-1) predicted tokens."""
    total = n * (T - 1)
    if total <= 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    if want <= 0 or want >= total:
        return torch.arange(total, device=dev)
    return torch.linspace(0, total - 1, want, device=dev).round().long().unique()


def token_losses(h: torch.Tensor, ln, W_U: torch.Tensor, targets: torch.Tensor,
                 chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Per-row next-token cross-entropy of residuals h [rows, d] through the final
    LayerNorm and W_U (the logit lens, at any layer), in float32, `chunk` rows of logits at
    a time: logsumexp minus
    the target's logit, which never writes the [rows, vocab] log-softmax (on CPU about a
    quarter faster than F.cross_entropy at GPT-2's vocabulary)."""
    out = []
    w = W_U.float()
    for s in range(0, h.shape[0], chunk):
        z = F.linear(ln(h[s:s + chunk]).float(), w)
        t = targets[s:s + chunk, None]
        out.append(z.logsumexp(-1) - z.gather(1, t)[:, 0])
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

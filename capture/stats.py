"""Per-neuron statistics reduced on the device, across every rank's slice, before anything
moves to the host: mean, std, min, max, fraction active (> 0) and the top-k tokens."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from trainer.dist import DistInfo


@torch.no_grad()
def neuron_stats(acts: torch.Tensor, info: DistInfo) -> dict[str, np.ndarray]:
    """acts [n, T, D] (this rank's sequences) -> each statistic [D] over all ranks' tokens.
    Collectives every rank must reach (three all-reduces)."""
    a = acts.flatten(0, 1)
    sums = torch.stack([
        a.sum(0, dtype=torch.float64),
        a.double().square().sum(0),
        (a > 0).sum(0, dtype=torch.float64),
        torch.full((a.shape[1],), float(a.shape[0]), dtype=torch.float64, device=a.device),
    ])
    lo, hi = a.amin(0), a.amax(0)
    if info.distributed:
        dist.all_reduce(sums)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    total, sq, active, count = sums
    mean = total / count
    std = (sq / count - mean.square()).clamp_min(0).sqrt()  # population std over tokens
    out = {"mean": mean, "std": std, "min": lo, "max": hi, "frac_active": active / count}
    return {k: v.float().cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def topk_tokens(acts: torch.Tensor, k: int, seq_start: int, info: DistInfo):
    """Top-k activations per neuron over all ranks' tokens: (value [D, k] float32, index
    [D, k] int32), index = seq * T + pos into the capture's [P, T] inputs. One all-gather."""
    n, T, D = acts.shape
    flat = acts.flatten(0, 1).float()
    kk = min(k, flat.shape[0])
    v, i = flat.topk(kk, dim=0)  # [kk, D]
    i = i + seq_start * T  # local row -> global flat token index
    if info.distributed:
        vs = [torch.empty_like(v) for _ in range(info.world)]
        is_ = [torch.empty_like(i) for _ in range(info.world)]
        dist.all_gather(vs, v)
        dist.all_gather(is_, i)
        v, i = torch.cat(vs), torch.cat(is_)
        v, sel = v.topk(min(k, v.shape[0]), dim=0)
        i = i.gather(0, sel)
    return v.t().contiguous().cpu().numpy(), i.t().contiguous().to(torch.int32).cpu().numpy()

"""The distributed facts and the few collectives capture (and the trainer's loop) need,
from torch.distributed itself: capture does not depend on the trainer's process-group
code. The trainer hands in any object with these attributes (its DistInfo is one)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class DistLike(Protocol):
    rank: int
    world: int
    device: torch.device
    distributed: bool  # a process group exists: collectives run

    @property
    def is_main(self) -> bool: ...


def barrier(info: DistLike) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistLike) -> torch.Tensor:
    """In place; a collective every rank must reach (gloo has no AVG, hence SUM)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistLike) -> bool:
    """True on every rank if it is True on any: a collective, and a host sync."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_cat(t: torch.Tensor, info: DistLike) -> torch.Tensor:
    """Every rank's `t` (same shape everywhere) concatenated along dim 0, rank order."""
    if not info.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter: an all-gather under FSDP (a collective every rank must reach)."""
    from torch.distributed.tensor import DTensor
    return p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()


def reshard(model) -> None:
    """Under FSDP2, back to the sharded fp32 parameters (no collective: gathered copies are
    only freed). A forward without a backward leaves the root and the last block gathered,
    in the compute dtype (bf16 under a bf16 policy); what reads weights whole (logit effects,
    snapshots) gathers the fp32 shards instead, so its values do not depend on the launch."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()

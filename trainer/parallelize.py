"""Everything that is not single-device model code, applied from outside in one place and
in a fixed order: activation checkpointing, then torch.compile, then FSDP2.

(The order matters: FSDP2's hooks must wrap the checkpointed, compiled blocks, so that
parameters are all-gathered once per block and the recompute in backward sees them.)
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from trainer.config import ConfigError, ParallelConfig
from trainer.dist import DistInfo
from trainer.model import GPT


def shard_group_size(pcfg: ParallelConfig, info: DistInfo) -> int:
    """Ranks that hold one copy of the weights between them: all of them for full/grad;
    one for 'none' (HSDP with shard groups of one: every rank holds all weights, DDP
    semantics); for hybrid, shard_size or the ranks of one node, so parameters are
    all-gathered within a node and only gradients cross between nodes."""
    if pcfg.sharding in ("full", "grad"):
        return info.world
    return 1 if pcfg.sharding == "none" else (pcfg.shard_size or info.local_world)


def device_mesh(pcfg: ParallelConfig, info: DistInfo):
    """1-D mesh for full/grad sharding; 2-D (replicate, shard) for none/hybrid. The shard
    groups are runs of consecutive ranks, which torchrun puts on one node."""
    dev = info.device.type
    if pcfg.sharding in ("full", "grad"):
        return init_device_mesh(dev, (info.world,), mesh_dim_names=("shard",))
    shard = shard_group_size(pcfg, info)
    return init_device_mesh(
        dev, (info.world // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def describe_groups(pcfg: ParallelConfig, info: DistInfo, hosts: list[str]) -> str:
    """The shard groups and the hosts they run on, for the run's log: a group that spans
    hosts all-gathers parameters between nodes at every block."""
    shard = shard_group_size(pcfg, info)
    groups = [list(range(g, g + shard)) for g in range(0, info.world, shard)]
    parts = [f"ranks {g[0]}-{g[-1]} on {'+'.join(dict.fromkeys(hosts[r] for r in g))}"
             if len(g) > 1 else f"rank {g[0]} on {hosts[g[0]]}" for g in groups]
    return f"{len(groups)} shard group(s) of {shard}: " + ", ".join(parts)


def check_parallel(pcfg: ParallelConfig, info: DistInfo) -> None:
    """What `parallelize` would refuse, checked before the run writes anything."""
    if pcfg.cpu_offload and info.device.type != "cuda":
        raise ConfigError("parallel.cpu_offload keeps GPU parameters in host memory; with no "
                          "GPU it has nothing to offload: set --parallel.cpu_offload=false")
    if pcfg.cpu_offload and not info.distributed:
        raise ConfigError("parallel.cpu_offload needs FSDP: launch with torchrun")
    if pcfg.sharding == "hybrid" and info.distributed:
        shard = pcfg.shard_size or info.local_world
        if info.world % shard:
            raise ConfigError(
                f"parallel.shard_size ({shard}) must divide the world size ({info.world})")


def parallelize(model: GPT, pcfg: ParallelConfig, info: DistInfo, dtype: str) -> GPT:
    check_parallel(pcfg, info)
    if pcfg.activation_checkpointing:
        # The composable API keeps module names (and so the hook names) unchanged.
        from torch.distributed._composable import checkpoint

        for block in model.blocks:
            checkpoint(block)
    if pcfg.compile:
        # Per block: small graphs compile fast and a hooked capture forward can still run
        # the same modules eagerly (hooks change the graph, so dynamo falls back).
        for block in model.blocks:
            block.compile()
    if not info.distributed:
        return model
    mesh = device_mesh(pcfg, info)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if dtype == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    kw = dict(mesh=mesh, mp_policy=mp)
    if pcfg.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    # grad sharding (ZeRO-2): keep parameters gathered from forward to backward, trading
    # memory for one all-gather less per block per step.
    reshard = pcfg.sharding != "grad"
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again at once by backward: keep them.
        fully_shard(block, reshard_after_forward=reshard and i < len(model.blocks) - 1, **kw)
    # The root (embeddings, final LayerNorm, head): FSDP's own default for a root keeps it
    # gathered from forward to backward, which needs it again at once (resharding it would
    # all-gather the 50257 x 768 embedding twice per micro-batch).
    fully_shard(model, **kw)
    return model

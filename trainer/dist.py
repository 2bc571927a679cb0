"""Process group set-up and the few collectives the training loop uses.

Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) the trainer joins a
process group: nccl on CUDA (with gloo beside it for CPU-offloaded tensors), gloo on CPU.
Launched as a plain `python -m trainer` it runs as one process with no process group and
no FSDP.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import ConfigError

# The collectives the loop shares with capture live in capture (which may not import the
# trainer): barrier, all_reduce_sum (in place, SUM: gloo has no AVG) and any_rank (a
# collective and a host sync). Every rank must reach each of them.
from capture.collectives import all_reduce_sum, any_rank, barrier  # noqa: F401 (re-exported)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group exists (FSDP applies)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int, local_world: int = 1) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device is 'cuda' but no CUDA device is visible")
        n = torch.cuda.device_count()
        if local_world > n:
            # NCCL refuses two ranks on one GPU (at init, with device_id): say so first.
            raise ConfigError(
                f"{local_world} local ranks but only {n} GPU{'s' if n != 1 else ''} on this "
                f"node; launch with --nproc_per_node={n} (or fewer), or train on CPU with "
                f"--parallel.device=cpu")
        return torch.device("cuda", local_rank)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("parallel.device is 'mps' but MPS is not available")
    return torch.device(requested)


def backend_for(dev: torch.device, cpu_offload: bool) -> str:
    """nccl on CUDA; with CPU offload the shards, gradients and gradient norm live in host
    memory, so CPU tensors need gloo in the same group."""
    if dev.type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def configure_device(dev: torch.device) -> None:
    """Per-process device settings. On CUDA: fp32 matmuls on TF32 tensor cores (about 8x
    the fp32 rate; 10 mantissa bits, as bf16 runs' accumulations already accept)."""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")


def init(device: str = "auto", cpu_offload: bool = False) -> DistInfo:
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        dev = pick_device(device, 0)
        configure_device(dev)
        return DistInfo(device=dev)
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    dev = pick_device(device, local_rank, local_world)
    configure_device(dev)
    if not dist.is_initialized():
        backend = backend_for(dev, cpu_offload)
        # A long timeout: rank 0 alone may spend minutes on a checkpoint or an eval print.
        dist.init_process_group(
            backend, timeout=timedelta(minutes=30),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, local_world, dev, distributed=True)


# What a collective raises when a peer process is gone (gloo's TCP pairs; NCCL's watchdog).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote process exited")


def lost_peer(e: BaseException) -> str:
    """The part of `e`'s message saying a peer rank is gone ('' if it says nothing of it)."""
    msg = str(e)
    return next((m for m in LOST_PEER if m in msg), "")


def rank_hosts(info: DistInfo) -> list[str]:
    """Every rank's host name, in rank order: a collective every rank must reach (and so a
    barrier). Where each rank runs, for the run's log and status file."""
    host = socket.gethostname()
    if not info.distributed:
        return [host]
    hosts: list = [None] * info.world
    dist.all_gather_object(hosts, host)
    return hosts


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()

"""What a first GPU run depends on and CPU can still check: the MFU peak by part and dtype,
the process group's backends, and the refusal of more local ranks than GPUs."""

import pytest
import torch

from trainer import dist as tdist
from trainer.config import ConfigError
from trainer.metrics import peak_flops


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 495e12),  # TF32: the trainer turns it on for CUDA
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H200 NVL", "fp32", 418e12),
    ("NVIDIA GH200 480GB", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA L4", "bf16", 121e12),
])
def test_peak_by_part_and_dtype(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA GeForce GTX 1080", "cpu", ""])
def test_unknown_parts_have_no_peak(name):
    assert peak_flops(name, "bf16") is None and peak_flops(name, "fp32") is None


def test_backends():
    assert tdist.backend_for(torch.device("cpu"), False) == "gloo"
    assert tdist.backend_for(torch.device("cuda", 0), False) == "nccl"
    # offloaded shards and gradients are CPU tensors: gloo beside nccl in the same group
    assert tdist.backend_for(torch.device("cuda", 0), True) == "cuda:nccl,cpu:gloo"


def test_more_local_ranks_than_gpus_is_one_clear_line(monkeypatch):
    # CPU-only here: the GPU count is what is patched. The real refusal on a one-GPU
    # machine is benchmarks/gpu_check.py's first check.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as e:
        tdist.pick_device("auto", local_rank=1, local_world=2)
    msg = str(e.value)
    assert "\n" not in msg and "2 local ranks but only 1 GPU" in msg
    assert "--nproc_per_node=1" in msg and "--parallel.device=cpu" in msg
    assert tdist.pick_device("cuda", local_rank=0, local_world=1) == torch.device("cuda", 0)


@pytest.mark.parametrize("sharding,shard_size,want", [
    ("hybrid", 0, "2 shard group(s) of 2: ranks 0-1 on n0, ranks 2-3 on n1"),
    ("hybrid", 4, "1 shard group(s) of 4: ranks 0-3 on n0+n1"),  # crosses nodes: said so
    ("full", 0, "1 shard group(s) of 4: ranks 0-3 on n0+n1"),
    ("none", 0, "4 shard group(s) of 1: rank 0 on n0, rank 1 on n0, rank 2 on n1, rank 3 on n1"),
])
def test_shard_groups_and_their_hosts(sharding, shard_size, want):
    """Hybrid sharding's groups default to one node's ranks (torchrun numbers a node's
    ranks consecutively), which the run's log shows with the hosts."""
    from trainer.config import ParallelConfig
    from trainer.parallelize import describe_groups

    info = tdist.DistInfo(rank=0, world=4, local_rank=0, local_world=2, distributed=True)
    pcfg = ParallelConfig(sharding=sharding, shard_size=shard_size)
    assert describe_groups(pcfg, info, ["n0", "n0", "n1", "n1"]) == want

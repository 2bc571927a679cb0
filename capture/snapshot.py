"""Weight snapshots: the model's parameters at a step, as bf16 (or fp16) safetensors with
the model's config, gathered from every rank and handed to the store as files. Loading a
snapshot back as a model is the trainer's (trainer/snapshots.py): it owns the model class."""

from __future__ import annotations

import json

import torch

from capture.collectives import DistLike, full_tensor, reshard

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def snapshot_files(model, model_config: dict, step: int, dtype: str, info: DistLike
                   ) -> dict[str, bytes] | None:
    """{model.safetensors, config.json} on rank 0, None elsewhere. Every rank must call it:
    under FSDP each parameter is all-gathered whole (a collective every rank must reach,
    one parameter at a time, in the same order everywhere) and rank 0 keeps it in host
    memory in `dtype`; the other ranks drop theirs at once. named_parameters yields a tied
    unembedding once (as wte.weight); the model has no buffers to keep."""
    dt = DTYPES[dtype]
    reshard(model)  # gathered from the fp32 shards, not from a forward's bf16 copies
    tensors = {}
    for name, p in model.named_parameters():
        whole = full_tensor(p)  # collective under FSDP
        if info.is_main:
            tensors[name] = whole.to("cpu", dt).contiguous()
        del whole
    if not info.is_main:
        return None
    from safetensors.torch import save
    weights = save(tensors, metadata={"step": str(step), "dtype": dtype})
    config = {"model": model_config, "step": int(step), "dtype": dtype,
              "format": "gpt2-live-capture snapshot 1"}
    return {WEIGHTS: weights, CONFIG: json.dumps(config, indent=1).encode()}

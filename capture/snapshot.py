"""Weight snapshots: the model's parameters at a step, as bf16 (or fp16) safetensors with
the model's config, gathered from every rank and handed to the store as files. Loading a
snapshot back as a model is the trainer's (trainer/snapshots.py): it owns the model class."""

from __future__ import annotations

import json

import torch

from capture._dist import DistLike

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def snapshot_files(model, model_config: dict, step: int, dtype: str, info: DistLike
                   ) -> dict[str, bytes] | None:
    """{model.safetensors, config.json} on rank 0, None elsewhere. Every rank must call it:
    under FSDP the whole parameters are all-gathered (collectives) to rank 0's host memory,
    one parameter at a time on the device."""
    if info.distributed:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    else:
        sd = model.state_dict()
    if not info.is_main:
        return None
    tied = model_config.get("tie_embeddings", True)
    dt = DTYPES[dtype]
    tensors = {}
    for name, t in sd.items():
        if tied and name == "lm_head.weight":
            continue  # the same tensor as wte.weight: stored once
        tensors[name] = t.detach().to("cpu", dt).contiguous()
    from safetensors.torch import save
    weights = save(tensors, metadata={"step": str(step), "dtype": dtype})
    config = {"model": model_config, "step": int(step), "dtype": dtype,
              "format": "gpt2-live-capture snapshot 1"}
    return {WEIGHTS: weights, CONFIG: json.dumps(config, indent=1).encode()}

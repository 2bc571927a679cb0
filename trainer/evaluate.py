"""Periodic evaluation: validation loss, a text sample, HellaSwag when its file is given.

Every function here runs on every rank: under FSDP each forward all-gathers parameters, so
all ranks must make the same number of forward calls.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from trainer import dist as tdist
from trainer.config import RunConfig
from trainer.data import DistributedLoader, TokenWindows


@torch.no_grad()
def val_loss(model, cfg: RunConfig, info: tdist.DistInfo, autocast) -> float:
    windows = TokenWindows(cfg.data.dir, "val", cfg.seq_len, shuffle=False)
    loader = DistributedLoader(windows, cfg.train.micro_batch_size, info.rank, info.world)
    total = torch.zeros(1, device=info.device)
    for _ in range(cfg.eval.val_batches):
        x, y = loader.next_batch()
        with autocast():
            total += model(x.to(info.device), y.to(info.device)).detach()
    tdist.all_reduce_sum(total, info)  # collective
    return total.item() / (cfg.eval.val_batches * info.world)


@torch.no_grad()
def sample(model, enc, cfg: RunConfig, info: tdist.DistInfo, step: int, autocast) -> str:
    # Same seed on every rank: identical logits give identical tokens, so every rank makes
    # the same number of forwards.
    g = torch.Generator().manual_seed(cfg.train.seed + step)
    prompt = enc.encode_ordinary(cfg.eval.sample_prompt) or [enc.eot_token]
    idx = torch.tensor([prompt], device=info.device)
    with autocast():
        out = model.generate(idx, cfg.eval.sample_tokens, cfg.eval.sample_temperature,
                             cfg.eval.sample_top_k, generator=g)
    return enc.decode(out[0].tolist())


def maybe_eval(model, cfg: RunConfig, info: tdist.DistInfo, step: int, enc, autocast,
               hellaswag_examples) -> dict[str, Any]:
    every = cfg.eval.every
    if every <= 0 or (step % every and step != cfg.train.max_steps):
        return {}
    model.eval()
    # Eager under a compiled model: eval mode, no_grad and generation's growing lengths
    # would each recompile the blocks (minutes, and a cache limit), for a few forwards.
    eager = torch.compiler.set_stance("force_eager") if cfg.parallel.compile \
        else contextlib.nullcontext()
    with eager:
        out: dict[str, Any] = {"val_loss": val_loss(model, cfg, info, autocast)}
        if hellaswag_examples:
            from trainer import hellaswag

            with autocast():
                hs = hellaswag.evaluate(model, hellaswag_examples, enc, info.device,
                                        info.rank, info.world)
            out["hellaswag_acc_norm"], out["hellaswag_acc"] = hs["acc_norm"], hs["acc"]
        if enc is not None and cfg.eval.sample_tokens > 0:
            out["sample"] = sample(model, enc, cfg, info, step, autocast)
    model.train()
    return out

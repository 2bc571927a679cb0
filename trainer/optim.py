"""AdamW with weight decay on matrices only, and the LR schedule: linear warmup, cosine
decay to a floor, then the floor."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    fused = cfg.fused == "true" or (cfg.fused == "auto" and device.type == "cuda")
    groups = model.param_groups(cfg.weight_decay)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based)."""
    floor = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    end = cfg.decay_steps or max_steps
    if step >= end:
        return floor
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

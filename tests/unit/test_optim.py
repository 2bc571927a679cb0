import math

import pytest

from trainer.config import ModelConfig, OptimConfig
from trainer.model import GPT
from trainer.optim import build_optimizer, lr_at


def test_schedule_warmup_cosine_floor():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, cfg, 200) == pytest.approx(0.1)
    assert lr_at(9, cfg, 200) == pytest.approx(1.0)
    assert lr_at(10, cfg, 200) == pytest.approx(1.0)
    assert lr_at(60, cfg, 200) == pytest.approx(0.1 + 0.45)  # halfway down the cosine
    assert lr_at(110, cfg, 200) == pytest.approx(0.1)
    assert lr_at(199, cfg, 200) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 200) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # decay_steps = 0: decay over the whole run
    assert lr_at(199, OptimConfig(lr=1.0, warmup_steps=0), 200) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 199 / 200)))


def test_weight_decay_on_matrices_only():
    import torch
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == m.cfg.num_params()  # every parameter once (tied head not twice)
    assert (opt.defaults["betas"]) == (0.9, 0.95)

"""Training-step speed of our GPT against Hugging Face's GPT2LMHeadModel (sdpa attention).

    python benchmarks/train_speed.py                      # CPU, small config (~1-2 min, 2 cores)
    python benchmarks/train_speed.py --compile            # also torch.compile'd ours
    python benchmarks/train_speed.py --device cuda --preset gpt2 --dtype bf16 --batch-size 16

One process, one config, one batch, the same starting weights (HF's are converted from ours)
and the same optimizer (AdamW lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on matrices).
A step is forward + loss + backward + optimizer step. The variants run interleaved, one step
each per round in a rotating order, after warmup; we report each one's median tokens/s and
the ratio ours/HF. On CUDA, MFU = tokens/s * model.flops_per_token(seq_len) / the GPU's dense
peak for the dtype (bf16, or TF32 for fp32: trainer/metrics.py's table, by name). bf16
means autocast with fp32 parameters, as trainer/train.py does.

Our model's loss path is trainer/loss.py's chunked unembedding + cross-entropy (the
gradient computed in the forward, never the whole [tokens, vocab] logits); HF's is its own
logits + cross-entropy. The maths is the same: the script checks the initial losses agree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import metrics  # noqa: E402
from trainer.dist import configure_device  # noqa: E402
from trainer.config import PRESETS, ModelConfig  # noqa: E402
from trainer.model import GPT  # noqa: E402

def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """The trainer's table (trainer/metrics.py): dense bf16, or TF32 for fp32 runs."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return metrics.peak_flops(name, dtype), name


# ------------------------------------------------------------------------------ harness


def make_optimizer(params_groups, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params_groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                             fused=True if device.type == "cuda" else None)


def decay_groups(model: torch.nn.Module, wd: float = 0.1) -> list[dict]:
    """Weight decay on matrices (2-D and up), none on vectors: GPT.param_groups' rule."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_hf(ours: GPT, device: torch.device):
    import transformers

    from trainer import hf

    cfg = hf.hf_config(ours.cfg)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(hf.hf_state_dict(ours), strict=False)
    assert not unexpected and not {k for k, _ in model.named_parameters()} & set(missing)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.to(device).train()


class Variant:
    def __init__(self, name: str, model: torch.nn.Module, loss_fn, device: torch.device,
                 groups: list[dict]):
        self.name, self.model, self.loss_fn, self.device = name, model, loss_fn, device
        self.opt = make_optimizer(groups, device)
        self.times: list[float] = []
        self.peak_mem = 0

    def step(self, x, y, autocast) -> float:
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with autocast():
            loss = self.loss_fn(self.model, x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_mem = max(self.peak_mem, torch.cuda.max_memory_allocated(dev))
        dt = time.perf_counter() - t0
        self.last_loss = loss.item()
        return dt


def ours_loss(model, x, y):
    return model(x, y)


def hf_loss(model, x, y):
    # HF shifts `labels` itself; shift_labels hands it our targets as they are, so both
    # models see the same T inputs and the same T targets.
    return model(input_ids=x, labels=y, shift_labels=y).loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="model shape preset")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=0, help="0: 1024 with --preset, else 256")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="0: block size")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step per variant)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    configure_device(device)  # as the trainer: TF32 for fp32 matmuls on CUDA
    shape = dict(PRESETS[a.preset]) if a.preset else dict(
        n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    block = a.block_size or (1024 if a.preset else 256)
    cfg = ModelConfig(**shape, block_size=block, vocab_size=a.vocab_size, dropout=0.0)
    T = a.seq_len or cfg.block_size
    B = a.batch_size
    torch.manual_seed(a.seed)

    ours = GPT(cfg).to(device).train()
    hf_model = build_hf(ours, device)
    g = torch.Generator().manual_seed(a.seed + 1)
    data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    bf16 = a.dtype == "bf16"
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16
                else contextlib.nullcontext)

    # Same numbers before timing anything: same weights, same loss.
    with torch.no_grad(), autocast():
        l_ours, l_hf = ours(x, y).item(), hf_loss(hf_model, x, y).item()
    tol = 2e-2 if bf16 else (2e-3 if device.type == "cuda" else 1e-4)  # TF32 on CUDA
    print(f"initial loss ours {l_ours:.6f} hf {l_hf:.6f} (|diff| {abs(l_ours - l_hf):.2e})")
    if abs(l_ours - l_hf) > tol:
        print("error: the two models disagree before training; not timing", file=sys.stderr)
        return 1

    variants = [Variant("ours", ours, ours_loss, device, ours.param_groups(0.1)),
                Variant("hf (sdpa)", hf_model, hf_loss, device, decay_groups(hf_model))]
    if a.compile:
        comp = GPT(cfg).to(device).train()
        comp.load_state_dict(ours.state_dict())
        compiled = torch.compile(comp)
        variants.append(Variant("ours compiled", compiled, ours_loss, device,
                                comp.param_groups(0.1)))

    peak, dev_name = peak_flops(device, a.dtype)
    fpt = ours.flops_per_token(T)
    print(f"device {dev_name} | dtype {a.dtype} | threads {torch.get_num_threads()} | model "
          f"n_layer {cfg.n_layer} n_head {cfg.n_head} n_embd {cfg.n_embd} vocab {cfg.vocab_size}"
          f" ({cfg.num_params() / 1e6:.1f}M params) | batch {B} x {T} = {B * T} tokens/step | "
          f"{fpt / 1e6:.1f} MFLOP/token")
    t_start = time.perf_counter()
    for v in variants:  # warmup (and compile): untimed
        for _ in range(a.warmup):
            t = v.step(x, y, autocast)
        print(f"  warmup {v.name}: {t:.2f} s/step")
    for r in range(a.steps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            v.times.append(v.step(x, y, autocast))
    elapsed = time.perf_counter() - t_start

    tok = B * T
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        tps = tok / med
        mfu = f"{100 * tps * fpt / peak:.1f}%" if peak else "n/a"
        mem = f"{v.peak_mem / 2**30:.1f}" if device.type == "cuda" else "-"
        rows.append((v.name, med * 1e3, min(v.times) * 1e3, tps, mfu, mem, v.last_loss))
    print(f"\n{a.steps} timed rounds, interleaved ({elapsed:.0f} s including warmup)")
    hdr = (f"{'variant':<28} {'median ms':>10} {'min ms':>9} {'tokens/s':>11} {'MFU':>7} "
           f"{'peak GiB':>9} {'last loss':>10}")
    print(hdr)
    print("-" * len(hdr))
    for name, med, mn, tps, mfu, mem, loss in rows:
        print(f"{name:<28} {med:>10.1f} {mn:>9.1f} {tps:>11.1f} {mfu:>7} {mem:>9} {loss:>10.4f}")
    tps = {v.name: r[3] for v, r in zip(variants, rows)}
    best = {v.name: min(v.times) for v in variants}
    print()
    print(f"ratio ours/hf tokens/s: {tps['ours'] / tps['hf (sdpa)']:.2f}x")
    print(f"(best steps: {best['hf (sdpa)'] / best['ours']:.2f}x; medians are the figure, the "
          "best-step ratio shows how much noise from other processes moved them)")
    for v in variants[2:]:
        print(f"ratio {v.name}/hf tokens/s: {tps[v.name] / tps['hf (sdpa)']:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

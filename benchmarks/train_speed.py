"""Training-step speed of our GPT against Hugging Face's GPT2LMHeadModel (sdpa attention).

    python benchmarks/train_speed.py                      # CPU, small config (~1-2 min, 2 cores)
    python benchmarks/train_speed.py --compile            # also torch.compile'd ours
    python benchmarks/train_speed.py --device cuda --preset gpt2 --dtype bf16 --batch-size 16

One process, one config, one batch, the same starting weights (HF's are converted from ours)
and the same optimizer (AdamW lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on matrices).
A step is forward + loss + backward + optimizer step. The variants run interleaved, one step
each per round in a rotating order, after warmup; we report each one's median tokens/s and
the ratio ours/HF. On CUDA, MFU = tokens/s * model.flops_per_token(seq_len) / peak bf16 FLOPS
of the GPU (by name). bf16 means autocast with fp32 parameters, as trainer/train.py does.

`--chunked-ce` also times a prototype (defined here, not in the model) of a training step
whose unembedding + cross-entropy runs in row chunks with the gradient computed in the
forward pass (never materialising the [tokens, vocab] logits); it is the change this
benchmark suggests for trainer/model.py, checked here to give the same loss and gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import PRESETS, ModelConfig  # noqa: E402
from trainer.model import GPT  # noqa: E402

PEAK_BF16 = [  # (substring of torch.cuda.get_device_name, dense bf16 FLOP/s)
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / NVL
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, name
    return None, name


# ------------------------------------------------------------ prototype: chunked linear+CE


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W.T, targets) computed `chunk` rows at a time; the gradients of h and W
    are computed in the forward (softmax - onehot), so neither the logits nor their
    log-softmax are ever held for the whole batch. Under autocast the matmuls run in the
    autocast dtype (as the model's lm_head Linear would), the softmax in fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        n = h.shape[0]
        with torch.autocast(dev, enabled=False):
            w = weight.to(cd)  # one cast of W, not one per chunk
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                hc, tc = h[s : s + chunk].to(cd), targets[s : s + chunk]
                logits = (hc @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # in place: softmax
                probs[torch.arange(probs.shape[0], device=probs.device), tc] -= 1.0
                g = probs.div_(n).to(cd)  # d(mean CE)/d(logits)
                grad_h[s : s + chunk] = g @ w
                if cd == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.w_dtype), None, None


def chunked_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """GPT.forward up to ln_final (the same modules), then the chunked unembedding + CE."""
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device)
    x = model.hook_embed(model.wte(idx)) + model.hook_pos_embed(model.wpe(pos))
    x = model.drop(x)
    for block in model.blocks:
        x = block(x)
    h = model.ln_final(x).flatten(0, 1)
    return ChunkedLinearCrossEntropy.apply(h, model.lm_head.weight, targets.flatten(), chunk)


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
    p.add_argument("--chunked-ce", action="store_true",
                   help="also time the chunked unembedding+CE prototype (see the docstring)")
    p.add_argument("--ce-chunk", type=int, default=512, help="rows per chunk for --chunked-ce")
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
    tol = 2e-2 if bf16 else 1e-4
    print(f"initial loss ours {l_ours:.6f} hf {l_hf:.6f} (|diff| {abs(l_ours - l_hf):.2e})")
    if abs(l_ours - l_hf) > tol:
        print("error: the two models disagree before training; not timing", file=sys.stderr)
        return 1

    variants = [Variant("ours", ours, ours_loss, device, ours.param_groups(0.1)),
                Variant("hf (sdpa)", hf_model, hf_loss, device, decay_groups(hf_model))]
    if a.chunked_ce:
        proto = GPT(cfg).to(device).train()
        proto.load_state_dict(ours.state_dict())
        check_chunked(proto, x, y, a.ce_chunk, autocast, bf16)
        variants.append(Variant(f"ours + chunked CE ({a.ce_chunk})", proto,
                                lambda m, x, y: chunked_loss(m, x, y, a.ce_chunk), device,
                                proto.param_groups(0.1)))
    if a.compile:
        comp = GPT(cfg).to(device).train()
        comp.load_state_dict(ours.state_dict())
        compiled = torch.compile(comp)
        variants.append(Variant("ours compiled", compiled, ours_loss, device,
                                comp.param_groups(0.1)))

    peak, dev_name = peak_flops(device)
    peak = peak if bf16 else None  # MFU against the bf16 peak only means something in bf16
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
    hdr = f"{'variant':<28} {'median ms':>10} {'min ms':>9} {'tokens/s':>11} {'MFU':>7} {'peak GiB':>9} {'last loss':>10}"
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


def check_chunked(model: GPT, x, y, chunk: int, autocast, bf16: bool) -> None:
    """The prototype's loss and gradients equal the model's own (no silent speed-for-maths)."""
    with autocast():
        ref = model(x, y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with autocast():
        loss = chunked_loss(model, x, y, chunk)
    loss.backward()
    worst = max(
        ((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
        for n, p in model.named_parameters()
    )
    model.zero_grad(set_to_none=True)
    print(f"chunked CE check: loss {loss.item():.6f} vs {ref.item():.6f}, "
          f"max relative grad diff {worst:.1e}")
    tol = 5e-2 if bf16 else 1e-3
    if abs(loss.item() - ref.item()) > (2e-2 if bf16 else 1e-4) or not math.isfinite(worst) or worst > tol:
        raise SystemExit("error: chunked CE prototype disagrees with the model; not timing it")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

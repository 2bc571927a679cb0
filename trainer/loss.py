"""Unembedding + cross-entropy in row chunks, with the gradient computed in the forward.

At GPT-2's vocabulary the [tokens, 50257] logits are the largest tensor of a training step
(B=16, T=1024: 3.3 GB in fp32), and log-softmax forward and backward stream them through
memory several times. Here `chunk` rows at a time: logits, log-sum-exp, loss, and at once
d(loss)/d(logits) = (softmax - onehot) / n (in fp32, cast once to the compute dtype), from
which the gradients of the hidden states and of the unembedding are accumulated. Neither
the logits nor their log-softmax are ever held for the whole batch; the matmuls are the same
three as the plain path. The cost: the gradients are computed even if backward is never
called, so this path is only taken when a gradient is wanted (see `linear_cross_entropy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 1024  # 1024 x 50257 fp32 logits = 206 MB per chunk


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        dev = h.device.type
        # Under autocast the matmuls run in the autocast dtype (as the lm_head Linear would);
        # the softmax always in fp32.
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        acc = torch.promote_types(cd, torch.float32)  # softmax and sums: fp32 at least
        n = h.shape[0]
        with torch.autocast(dev, enabled=False):
            w = weight.to(cd)  # one cast of W, not one per chunk
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            total = torch.zeros((), dtype=acc, device=h.device)
            rows = torch.arange(min(chunk, n), device=h.device)
            for s in range(0, n, chunk):
                hc, tc = h[s:s + chunk].to(cd), targets[s:s + chunk]
                logits = (hc @ w.t()).to(acc)
                logits.sub_(logits.amax(dim=-1, keepdim=True))
                shifted_target = logits.gather(1, tc[:, None])
                g = logits.exp_()  # E = exp(x - max), in place
                z = g.sum(dim=-1, keepdim=True)
                total += (z.log() - shifted_target).sum()  # CE = log Z - (x_t - max)
                # d CE / d logits / n = (E / Z - onehot) / n, formed in fp32 and cast once.
                # In bf16 the subtraction would cancel for a confident target (E / Z ~ 1):
                # its gradient, and the unembedding's, would be rounding noise. One more
                # pass over [chunk, vocab] than folding 1/Z into the small operands.
                g.div_(z * n)
                g[rows[:len(tc)], tc] -= 1.0 / n
                gc = g.to(cd)
                grad_h[s:s + chunk] = gc @ w
                if cd == acc:
                    grad_w.addmm_(gc.t(), hc)
                else:  # addmm_ cannot mix a bf16 product into an fp32 accumulator
                    grad_w += (gc.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.w_dtype),
                None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """mean CE(h @ weight.T, targets) for h [n, d], weight [V, d], targets [n]."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk)
    # Evaluation: the same chunks, loss only (GPT-2's whole [16K, 50257] validation batch
    # would be 3.3 GB of fp32 logits, and as much again for its log-softmax).
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        z = F.linear(h[s:s + chunk], weight).float()
        total += (z.logsumexp(-1) - z.gather(1, targets[s:s + chunk, None])[:, 0]).sum()
    return total / h.shape[0]

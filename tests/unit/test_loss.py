"""The chunked unembedding + cross-entropy gives the plain path's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import linear_cross_entropy


@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 64), (10, 512)])
def test_matches_plain_cross_entropy(n, chunk):
    torch.manual_seed(0)
    h = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (n,))
    ref = F.cross_entropy(h @ w.t(), t)
    ref.backward(torch.tensor(2.5, dtype=torch.float64))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    loss.backward(torch.tensor(2.5, dtype=torch.float64))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_no_grad_loss_in_chunks_equals_the_gradient_path():
    torch.manual_seed(0)
    h, w, t = torch.randn(20, 8), torch.randn(50, 8), torch.randint(0, 50, (20,))
    with torch.no_grad():
        a = linear_cross_entropy(h, w, t, chunk=4)
    b = linear_cross_entropy(h.requires_grad_(), w, t, chunk=4)
    torch.testing.assert_close(a, b.detach())


def test_model_loss_and_gradients_match_logits_path():
    from trainer.config import ModelConfig
    from trainer.model import GPT

    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=97))
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    ref = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    loss = m(x, y)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], msg=k)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (40,))
    ref = F.cross_entropy(h @ w.t(), t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(h.grad, gh, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(w.grad, gw, atol=2e-3, rtol=5e-2)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("confident", [False, True])
def test_pure_bf16_gradients_close_to_fp64(confident):
    """FSDP's bf16 policy casts the parameters themselves (no autocast): h and W arrive in
    bf16. The gradients must stay within bf16's precision of the fp64 ones, also when the
    model is sure of its targets (softmax ~ onehot, where forming softmax - onehot in bf16
    would cancel to noise)."""
    torch.manual_seed(0)
    n, d, V = 256, 64, 2000
    h64 = torch.randn(n, d, dtype=torch.float64)
    w64 = torch.randn(V, d, dtype=torch.float64) * 0.1
    t = torch.randperm(V)[:n]  # distinct targets: each gets its own boost below
    if confident:  # the target's logit far above the rest: p(target) about 0.999
        w64[t] += h64 * (16.0 / h64.square().sum(1, keepdim=True))
        # round to bf16 first, so that fp64 and bf16 start from the same numbers
    h64, w64 = h64.bfloat16().double(), w64.bfloat16().double()
    h, w = (x.bfloat16().requires_grad_() for x in (h64, w64))
    h64.requires_grad_(), w64.requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), t)
    ref.backward()
    if confident:
        assert (h64 @ w64.t()).softmax(-1).gather(1, t[:, None]).mean() > 0.99
    loss = linear_cross_entropy(h, w, t, chunk=64)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) <= 1e-2 * max(ref.item(), 1e-2)
    # bf16 keeps 8 bits: a few parts in a thousand per value. For confident targets the
    # gradient is the small p - 1 and the bf16 logits (about 0.06 off at 16) move p: a few
    # percent remain (a plain bf16 F.cross_entropy is 100% off here, softmax - onehot
    # formed in bf16 93%).
    tol = 5e-2 if confident else 1e-2
    assert _rel_err(h.grad, h64.grad) < tol
    assert _rel_err(w.grad, w64.grad) < tol

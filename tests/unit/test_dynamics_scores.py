"""capture.dynamics on hand-built inputs whose scores are known in closed form, and against
brute-force or full-tensor computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformer_lens.head_detector import get_induction_head_detection_pattern

from capture.dynamics import (
    HEAD_SCORES,
    attention_entropy,
    duplicate_token_score,
    head_scores,
    induction_score,
    neuron_logit_effects,
    prev_token_score,
    repeated_tokens,
)
from capture.forward import token_losses
from trainer.config import ModelConfig
from trainer.model import GPT, LayerNorm

N = 4  # half: T = 8
T = 2 * N


def _pat(rows: dict[int, dict[int, float]], T: int = T) -> torch.Tensor:
    """[T, T] pattern from {query: {key: weight}}; unlisted queries attend to themselves."""
    p = torch.zeros(T, T)
    for q in range(T):
        for k, v in rows.get(q, {q: 1.0}).items():
            p[q, k] = v
    assert torch.allclose(p.sum(-1), torch.ones(T)) and not p.triu(1).any()
    return p


PREV = _pat({q: {q - 1: 1.0} for q in range(1, T)})
UNIFORM = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
INDUCTION = _pat({q: {q - N + 1: 1.0} for q in range(N, T)})
DUPLICATE = _pat({q: {q - N: 1.0} for q in range(N, T)})
MIX = _pat({q: {q - N: 0.5, q - N + 1: 0.5} for q in range(N, T)})
SELF = _pat({})


def _one(p: torch.Tensor) -> torch.Tensor:
    return p[None, None]  # [batch 1, head 1, T, T]


def _scores(p: torch.Tensor) -> list[float]:
    return [s.item() for s in head_scores(p, p, N).values()]


def test_single_patterns():
    # [entropy, prev_token, duplicate, induction]
    assert _scores(_one(PREV)) == [0.0, 1.0, 0.0, 0.0]
    assert _scores(_one(SELF)) == [0.0, 0.0, 0.0, 0.0]
    assert _scores(_one(INDUCTION)) == [0.0, 0.0, 0.0, 1.0]
    assert _scores(_one(DUPLICATE)) == [0.0, 0.0, 1.0, 0.0]
    # second-half rows 0.5/0.5: entropy log 2 on N of the T-1 scored rows, 0 on the rest
    ent, prev, dup, ind = _scores(_one(MIX))
    assert ent == pytest.approx(N * math.log(2) / (T - 1), rel=1e-6)
    assert (prev, dup, ind) == (0.0, 0.5, 0.5)


def test_uniform_causal():
    ent, prev, dup, ind = _scores(_one(UNIFORM))
    qs = range(1, T)  # row q spreads over q + 1 keys
    assert ent == pytest.approx(sum(math.log(q + 1) for q in qs) / (T - 1), rel=1e-6)
    assert prev == pytest.approx(sum(1 / (q + 1) for q in qs) / (T - 1), rel=1e-6)
    second = sum(1 / (q + 1) for q in range(N, T)) / N
    assert dup == pytest.approx(second, rel=1e-6) and ind == pytest.approx(second, rel=1e-6)


def test_head_and_batch_axes():
    # head h of batch b: each head averages its two batch rows; heads must not mix
    heads = [(PREV, UNIFORM), (INDUCTION, MIX), (DUPLICATE, DUPLICATE)]
    p = torch.stack([torch.stack([h[b] for h in heads]) for b in range(2)])  # [2, 3, T, T]
    got = head_scores(p, p, N)
    assert list(got) == list(HEAD_SCORES)
    for h, (a, b) in enumerate(heads):
        for name in HEAD_SCORES:
            want = (head_scores(_one(a), _one(a), N)[name] + head_scores(_one(b), _one(b), N)
                    [name]) / 2
            assert got[name][h].item() == pytest.approx(want.item(), abs=1e-7), (h, name)
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in got.values())
    # bf16 patterns (the model's under mixed precision) still give float32 scores
    got16 = head_scores(p.bfloat16(), p.bfloat16(), N)
    assert all(v.dtype == torch.float32 for v in got16.values())
    for name in HEAD_SCORES:  # 1/(q+1) of the uniform rows rounds in bf16
        assert torch.allclose(got16[name], got[name], atol=1e-2), name


def test_missing_inputs_leave_keys_out():
    p = _one(PREV)
    assert list(head_scores(p, None, N)) == ["entropy", "prev_token"]
    assert list(head_scores(None, p, N)) == ["duplicate", "induction"]
    assert head_scores(None, None, N) == {}


def _random_pattern(b, h, t, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, h, t, t, generator=g) * 2
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def test_random_pattern_brute_force_and_transformer_lens():
    p = _random_pattern(3, 2, T, seed=0)
    B, H = p.shape[:2]
    ent = torch.zeros(H)
    prev, dup, ind = torch.zeros(H), torch.zeros(H), torch.zeros(H)
    for b in range(B):
        for h in range(H):
            for q in range(1, T):
                row = p[b, h, q, : q + 1]
                ent[h] -= (row * row.log()).sum() / (B * (T - 1))
                prev[h] += p[b, h, q, q - 1] / (B * (T - 1))
            for q in range(N, T):
                dup[h] += p[b, h, q, q - N] / (B * N)
                ind[h] += p[b, h, q, q - N + 1] / (B * N)
    assert torch.allclose(attention_entropy(p), ent, atol=1e-6)
    assert torch.allclose(prev_token_score(p), prev, atol=1e-6)
    assert torch.allclose(duplicate_token_score(p, N), dup, atol=1e-6)
    assert torch.allclose(induction_score(p, N), ind, atol=1e-6)
    # TransformerLens' induction detection pattern on distinct tokens repeated, restricted to
    # the second-half rows (its first-half rows are all zero here)
    det = get_induction_head_detection_pattern(torch.arange(N).repeat(2)[None])
    assert det[:N].sum() == 0 and det[N:].sum() == N
    tl = (p * det).sum((-2, -1)).mean(0) / N
    assert torch.allclose(induction_score(p, N), tl, atol=1e-6)


def test_pattern_shape_errors():
    with pytest.raises(ValueError, match="T = 2 \\* half"):
        induction_score(_one(PREV), N + 1)
    with pytest.raises(ValueError, match="T >= 2"):
        attention_entropy(torch.ones(1, 1, 1, 1))


def test_repeated_tokens():
    a = repeated_tokens(5, 7, vocab=100, seed=3, low=10)
    assert a.shape == (5, 14) and a.dtype == torch.int64
    assert torch.equal(a[:, :7], a[:, 7:])
    assert a.min() >= 10 and a.max() < 100
    torch.manual_seed(123)  # the global RNG state must not matter
    assert torch.equal(a, repeated_tokens(5, 7, vocab=100, seed=3, low=10))
    assert not torch.equal(a, repeated_tokens(5, 7, vocab=100, seed=4, low=10))
    assert len(repeated_tokens(64, 64, vocab=1000, seed=0).unique()) > 900  # covers the range


def _ln(d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ln = LayerNorm(d, bias=True)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(d, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(d, generator=g))
    return ln.to(dtype)


@torch.no_grad()
def logit_lens(resids, ln, W_U, tokens, chunk):
    """Mean next-token loss of each layer's residual, as the capture forward computes it."""
    return torch.stack([token_losses(r[:, :-1].flatten(0, 1), ln, W_U, tokens[:, 1:].flatten(),
                                     chunk=chunk).mean() for r in resids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_lens_matches_full_logits(dtype):
    g = torch.Generator().manual_seed(0)
    B, P, D, V = 3, 9, 8, 50
    resids = [torch.randn(B, P, D, generator=g).to(dtype) for _ in range(3)]
    tokens = torch.randint(0, V, (B, P), generator=g)
    ln, W_U = _ln(D, 1, dtype), (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    with torch.no_grad():
        want = torch.stack([F.cross_entropy(F.linear(ln(r[:, :-1]), W_U).float().flatten(0, 1),
                                            tokens[:, 1:].flatten()) for r in resids])
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: row blocking may round differently
    for chunk in (1, 5, 7, B * (P - 1), 1000):  # 5 and 7 do not divide the 24 rows
        got = logit_lens(resids, ln, W_U, tokens, chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == (3,)
        assert torch.allclose(got, want, rtol=tol, atol=tol), (chunk, got, want)
    assert (want.diff().abs() > 0.05).all(), want  # each layer really gets its own loss


def test_logit_lens_last_layer_is_the_model_loss():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=40)).eval()
    idx = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        loss = model(idx, return_type="loss")
        _, cache = model.run_with_cache(idx)
    resids = [cache[f"blocks.{i}.hook_resid_post"] for i in range(2)]
    got = logit_lens(resids, model.ln_final, model.lm_head.weight, idx, chunk=5)
    assert got[1].item() == pytest.approx(loss.item(), rel=1e-5)
    # under autocast the unembedding runs in bf16, as in the model's own forward
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        loss16 = model(idx, return_type="loss")
        got16 = logit_lens(resids, model.ln_final, model.lm_head.weight, idx, chunk=5)
    assert got16[1].item() == pytest.approx(loss16.item(), rel=1e-2)


def _brute_effects(W_out, ln_weight, W_U):
    w = W_out.float()
    return ((w - w.mean(-1, keepdim=True)) * ln_weight.float()) @ W_U.float().t()


def _weights(seed, d_mlp=10, d=6, V=20):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_mlp, d, generator=g), torch.rand(d, generator=g) + 0.5,
            torch.randn(V, d, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neuron_logit_effects_brute_force(dtype):
    W_out, gain, W_U = (t.to(dtype) for t in _weights(0))
    full = _brute_effects(W_out, gain, W_U)
    top_v, top_i, bot_v, bot_i = neuron_logit_effects(W_out, gain, W_U, k=3, chunk=4)
    assert top_i.dtype == bot_i.dtype == torch.int64 and top_v.dtype == torch.float32
    assert top_v.shape == top_i.shape == bot_v.shape == bot_i.shape == (10, 3)
    order = full.argsort(-1, descending=True)
    assert torch.equal(top_i, order[:, :3]) and torch.equal(bot_i, order.flip(-1)[:, :3])
    assert torch.allclose(top_v, full.gather(1, top_i), atol=1e-5)
    assert torch.allclose(bot_v, full.gather(1, bot_i), atol=1e-5)
    assert (top_v.diff(dim=-1) <= 0).all() and (bot_v.diff(dim=-1) >= 0).all()
    with pytest.raises(ValueError, match="k = 21"):
        neuron_logit_effects(W_out, gain, W_U, k=21)


def test_neuron_logit_effects_ignore_a_constant_shift():
    W_out, gain, W_U = _weights(1)
    shifted = W_out + torch.randn(10, 1) * 5  # a different constant for each neuron's row
    for a, b in zip(neuron_logit_effects(W_out, gain, W_U, k=3, chunk=3),
                    neuron_logit_effects(shifted, gain, W_U, k=3, chunk=3)):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)


def test_neuron_logit_effects_match_final_layernorm_up_to_scale():
    # A neuron alone in the stream, x = a * w: ln_final(x) - bias = gain * a w_c / sqrt(a^2
    # var(w) + eps), so its logits less the bias's are the effect times a positive scale.
    W_out, _, W_U = _weights(2)
    ln = _ln(6, 3)
    a = 2.5
    with torch.no_grad():
        real = F.linear(ln(a * W_out), W_U) - F.linear(ln.bias, W_U)  # [d_mlp, vocab]
    var = W_out.var(-1, unbiased=False, keepdim=True)
    scale = a / (a * a * var + LayerNorm.eps).sqrt()
    effect = _brute_effects(W_out, ln.weight.detach(), W_U)
    assert torch.allclose(real, effect * scale, atol=1e-5)
    top_v, top_i, bot_v, bot_i = neuron_logit_effects(W_out, ln.weight.detach(), W_U, k=3,
                                                      chunk=4)
    assert torch.equal(top_i, real.topk(3).indices)
    assert torch.equal(bot_i, real.topk(3, largest=False).indices)

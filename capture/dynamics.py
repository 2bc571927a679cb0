"""Training-dynamics scores from a probe forward pass: pure tensor functions, no collectives
and no I/O (the capturer gathers what each rank computed and writes it).

Attention patterns follow TransformerLens' `blocks.{l}.attn.hook_pattern`: [batch, head,
query, key], each row a softmax over the keys at or before the query. Per head, averaged
over the batch:

- entropy: -sum_k p log p of a query's row, in nats, averaged over queries 1..T-1 (query 0
  can only attend to itself). Low: the head picks out few positions; log(q + 1): uniform.
- prev_token: the weight query q gives to key q - 1.
- duplicate, induction: on a sequence of n random tokens repeated once (T = 2n), the weight
  each second-half query q gives to q - n, the previous occurrence of its own token
  (duplicate-token head), and to q - n + 1, the token that followed it there (induction
  head). Olsson et al. 2022, "In-context learning and induction heads", use this repeated
  random-token probe; the induction score is their prefix-matching score and the mean of
  TransformerLens' stripe `pattern.diagonal(offset=1 - n)` as in its demos, over the
  second-half queries only (not `head_detector.detect_head`'s "mul" measure, which divides
  by the attention of every row, so tops out near 1/2 on this probe).

The logit lens (each layer's residual stream through the final LayerNorm and the
unembedding, scored as next-token cross-entropy; nostalgebraist 2020) is computed in the
capture forward (`capture.forward.token_losses`). Neuron logit effects: each MLP
neuron's output direction through the same path, from the weights alone (the direct-logit
attribution of TransformerLens' `W_out @ W_U`, with the final LayerNorm treated as in
`neuron_logit_effects`).
"""

from __future__ import annotations

import torch

HEAD_SCORES = ("entropy", "prev_token", "duplicate", "induction")


def _check_pattern(pattern: torch.Tensor, half: int | None = None) -> None:
    if pattern.dim() != 4 or pattern.shape[-1] != pattern.shape[-2] or pattern.shape[-1] < 2:
        raise ValueError(f"pattern must be [batch, head, T, T] with T >= 2, got "
                         f"{tuple(pattern.shape)}")
    if half is not None and (half < 1 or pattern.shape[-1] != 2 * half):
        raise ValueError(f"repeated-sequence pattern must have T = 2 * half = {2 * half}, "
                         f"got T = {pattern.shape[-1]}")


@torch.no_grad()
def attention_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """pattern [batch, head, query, key] (rows sum to 1, causal) -> [head]: mean over batch
    and query positions 1..T-1 of -sum_k p log p, in nats (position 0 can only attend to
    itself: entropy 0 always, so it is left out). 0 log 0 = 0."""
    _check_pattern(pattern)
    p = pattern[..., 1:, :].float()
    return -torch.xlogy(p, p).sum(-1).mean((0, 2))  # xlogy: 0 log 0 = 0, masked keys add 0


def _stripe(pattern: torch.Tensor, offset: int) -> torch.Tensor:
    # diagonal(offset) holds pattern[..., q, q + offset] for every q where it exists
    return pattern.diagonal(offset=offset, dim1=-2, dim2=-1).float()


@torch.no_grad()
def prev_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """[head]: mean over batch and queries q = 1..T-1 of pattern[..., q, q-1]."""
    _check_pattern(pattern)
    return _stripe(pattern, -1).mean((0, 2))


@torch.no_grad()
def duplicate_token_score(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """On sequences whose second half repeats the first (tokens t_0..t_{n-1} t_0..t_{n-1},
    n = half, T = 2n): [head] mean over batch and q = n..2n-1 of pattern[..., q, q-n]
    (attention to the previous occurrence of the same token)."""
    _check_pattern(pattern, half)
    return _stripe(pattern, -half).mean((0, 2))  # offset -n: exactly q = n..2n-1


@torch.no_grad()
def induction_score(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """Same sequences: [head] mean over q = n..2n-1 of pattern[..., q, q-n+1] (attention to
    the token after the previous occurrence: TransformerLens's diagonal at offset 1-n)."""
    _check_pattern(pattern, half)
    # The stripe starts at q = n-1 (key 0), a first-half query with no earlier occurrence.
    return _stripe(pattern, 1 - half)[..., 1:].mean((0, 2))


@torch.no_grad()
def head_scores(natural: torch.Tensor | None, repeated: torch.Tensor | None, half: int
                ) -> dict[str, torch.Tensor]:
    """One layer's scores: {"entropy", "prev_token"} from the natural probe's pattern and
    {"duplicate", "induction"} from the repeated-sequence pattern; a missing input leaves
    its keys out. Each value [head], float32."""
    out: dict[str, torch.Tensor] = {}
    if natural is not None:
        out["entropy"] = attention_entropy(natural)
        out["prev_token"] = prev_token_score(natural)
    if repeated is not None:
        out["duplicate"] = duplicate_token_score(repeated, half)
        out["induction"] = induction_score(repeated, half)
    return out


def repeated_tokens(n_seqs: int, half: int, vocab: int, seed: int, low: int = 0
                    ) -> torch.Tensor:
    """int64 [n_seqs, 2*half]: uniform random tokens in [low, vocab), the second half a copy
    of the first. Drawn on the CPU from its own seeded generator, so every rank and machine
    gets the same set whatever the global RNG state; the caller moves it to the device."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab, (n_seqs, half), generator=g, dtype=torch.int64)
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def neuron_logit_effects(W_out: torch.Tensor, ln_weight: torch.Tensor, W_U: torch.Tensor,
                         k: int, chunk: int = 64
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct logit effect of each MLP neuron from the weights alone: the k tokens each
    neuron most promotes and most suppresses when it fires, not counting what later layers
    make of its output.

    W_out [d_mlp, d_model]: row i is what neuron i adds to the residual stream per unit of
    activation (our mlp.c_proj.weight is nn.Linear's [d_model, d_mlp]: pass its transpose).
    ln_weight [d_model]: ln_final's gain. W_U [vocab, d_model].

    The final LayerNorm, step by step: it centres the residual, a linear map, applied here
    exactly by subtracting each row's mean over d_model; it divides by the std of the whole
    residual, a positive per-token scalar that depends on everything else in the stream,
    left out, so effects are per unit of that scale and each neuron's ranking of tokens is
    unchanged; it multiplies by its gain, folded into W_U exactly; and it adds its bias, the
    same logit shift whatever the neuron, left out.

        effect = (W_out - W_out.mean(-1, keepdim=True)) * ln_weight @ W_U.T   [d_mlp, vocab]

    computed `chunk` neurons at a time (64: the [chunk, vocab] block stays near the cache,
    measured faster on CPU than 256 or 16), never the whole [d_mlp, vocab], in float32 whatever
    the input dtype. Returns (top_values [d_mlp, k], top_ids [d_mlp, k] int64,
    bottom_values [d_mlp, k], bottom_ids [d_mlp, k]): the k most promoted tokens (largest
    effect, descending) and the k most suppressed (smallest effect, ascending)."""
    if not 1 <= k <= W_U.shape[0]:
        raise ValueError(f"k = {k} must be in 1..vocab = {W_U.shape[0]}")
    w_u = W_U.float()
    gain = ln_weight.float()
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, W_out.shape[0], chunk):
        w = W_out[s:s + chunk].float()
        effect = ((w - w.mean(-1, keepdim=True)) * gain) @ w_u.t()  # gain on the small side
        top = effect.topk(k, dim=-1)
        bottom = (-effect).topk(k, dim=-1)  # the largest of the negation: faster on CPU
        parts.append((top.values, top.indices, -bottom.values, bottom.indices))
    return tuple(torch.cat(p) for p in zip(*parts))

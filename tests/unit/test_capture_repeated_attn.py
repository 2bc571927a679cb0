"""The capture keeps the repeated-token probe's attention at full captures: every rank runs
the whole probe and keeps sequences rank, rank + W, ...; the kept pattern is the model's
own at store.schema.repeated_positions, in the probe's own batch or in a forward of its
own; uncut, its induction stripe's mean is the induction score the capture stores. The
layout asks for it by default (Ar = min(R, A), Na = min(N, attn_len))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture import dynamics
from capture.config import CaptureConfig
from capture.forward import CaptureForward
from capture.spec import CaptureSpec, build_layout
from store.schema import repeated_positions
from trainer.config import ModelConfig
from trainer.model import GPT

R, HALF = 3, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50)).eval()


def spec(T: int) -> CaptureSpec:
    return CaptureSpec(act_hooks={}, stat_hooks={"blocks.0.hook_resid_post": 16},
                       attn_layers=[0, 1], n_seqs=2, seq_len=T, n_layers=2, n_heads=2,
                       d_mlp=64, head_scores=list(dynamics.HEAD_SCORES), repeat_half=HALF)


def patterns(model, tokens) -> dict[int, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("pattern"))
    return {i: cache[f"blocks.{i}.attn.hook_pattern"] for i in range(2)}


@torch.no_grad()
@pytest.mark.parametrize("T", [16, 12])  # the probe's batch, or a forward of its own
@pytest.mark.parametrize("kept", [16, 8])  # uncut (T = 16), or cut to 8 of 16 positions
def test_each_rank_keeps_its_repeated_sequences_the_models_own(model, T, kept):
    rep = dynamics.repeated_tokens(R, HALF, 50, seed=1)
    probe = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(2))
    want = patterns(model, rep)
    kept = min(kept, T)  # as the layout has it: Na = min(N, attn_len), attn_len <= T
    pos = torch.from_numpy(repeated_positions(2 * HALF, kept))
    got: dict[int, dict[int, np.ndarray]] = {0: {}, 1: {}}
    for rank in range(2):
        f = CaptureForward(spec(T), 3, 2, kept, 64, 4096, False, rank, 2, R, kept)
        assert f.rep_mine == [[0, 2], [1]][rank]
        res = f.run(model, probe[rank:rank + 1], rank, True, rep)
        if T != 2 * HALF:
            assert not res.repeated  # the capturer runs the probe on its own
            f.run_repeated(model, rep, res)
        for layer, p in res.rep_attn.items():
            assert p.dtype == torch.float16 and p.shape == (len(f.rep_mine), 2, kept, kept)
            for j, r in enumerate(f.rep_mine):
                got[layer][r] = p[j].float().numpy()
                np.testing.assert_allclose(got[layer][r], want[layer][r][:, pos][:, :, pos],
                                           atol=1e-3)
        # a summary capture keeps none
        assert not f.run(model, probe[rank:rank + 1], rank, False, rep).rep_attn
    if kept == 2 * HALF:  # the stripe the page marks, over every sequence: the score
        for layer in range(2):
            whole = torch.from_numpy(np.stack([got[layer][r] for r in range(R)]))
            q = torch.arange(HALF, 2 * HALF)
            stripe = whole[:, :, q, q - HALF + 1].mean((0, 2))
            np.testing.assert_allclose(stripe, dynamics.induction_score(want[layer], HALF),
                                       atol=1e-3)


def test_the_layout_keeps_it_by_default():
    c = CaptureConfig()
    sp = spec(16)
    rep = np.zeros((c.repeat_seqs, 2 * HALF), np.int32)
    lay = build_layout(sp, c, 1, 10, {}, np.zeros((2, 16), np.int32), rep)
    assert (c.attn_seqs, c.repeat_seqs, c.attn_len) == (4, 4, 128)
    assert (lay.attn_seqs, lay.repeat_attn_seqs, lay.repeat_attn_len) == (2, 2, 16)
    c = CaptureConfig(attn_len=6)
    lay = build_layout(sp, c, 1, 10, {}, np.zeros((2, 16), np.int32), rep)
    assert (lay.attn_len, lay.repeat_attn_len) == (6, 6)
    for off in (CaptureConfig(attn_seqs=0), CaptureConfig(full_every=0),
                CaptureConfig(attn_layers="none")):
        sp2 = spec(16)
        sp2.attn_layers = [] if off.attn_layers == "none" else sp2.attn_layers
        lay = build_layout(sp2, off, 1, 10, {}, np.zeros((2, 16), np.int32), rep)
        assert lay.repeat_attn_seqs == 0 and "attn_repeated/0" not in {
            s.path for s in lay.array_specs(1)}

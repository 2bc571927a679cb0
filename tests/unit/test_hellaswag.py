"""HellaSwag loading, rendering and scoring, checked against Hugging Face's GPT-2 as reference."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from helpers import BPE
from trainer import hellaswag
from trainer.config import ModelConfig, UserError
from trainer.hellaswag import evaluate, load_examples, render
from trainer.model import GPT

ASSET = Path(__file__).resolve().parents[1] / "assets" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="module")
def enc(shared):
    try:
        from trainer.tokenizer import get_encoding
    except ImportError:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_base

        return tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_base()["pat_str"],
            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(BPE)),
            special_tokens={"<|endoftext|>": 50256},
        )
    return get_encoding(str(BPE))


@pytest.fixture(scope="module")
def examples():
    return load_examples(str(ASSET))


@pytest.fixture(scope="module")
def models():
    """A small random GPT and a Hugging Face GPT2LMHeadModel holding the same weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)
    ours = GPT(cfg).eval()
    hf_cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    src = dict(ours.named_parameters())
    mapping = {
        "transformer.wte.weight": "wte.weight",
        "transformer.wpe.weight": "wpe.weight",
        "transformer.ln_f.weight": "ln_final.weight",
        "transformer.ln_f.bias": "ln_final.bias",
    }
    hf_names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.c_attn",
                "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
    for layer in range(cfg.n_layer):
        for h, o in hf_names.items():
            for kind in ("weight", "bias"):
                mapping[f"transformer.h.{layer}.{h}.{kind}"] = f"blocks.{layer}.{o}.{kind}"
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight",
                  "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            w = src[mapping[name]]
            if name.endswith(transposed):
                w = w.t()  # HF Conv1D stores [in, out]; nn.Linear stores [out, in]
            assert p.shape == w.shape, name
            p.copy_(w)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    # Sanity: the two models agree on logits.
    x = torch.randint(0, 50257, (2, 20))
    torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    return ours, hf


def hf_reference(hf, ex, enc) -> tuple[int, int]:
    """Independent scoring: each ending on its own, unpadded. -> (argmin sum, argmin mean)."""
    ctx = enc.encode(ex["ctx"])
    sums, means = [], []
    for ending in ex["endings"]:
        end = enc.encode(" " + ending)
        ids = torch.tensor([ctx + end])
        with torch.no_grad():
            logp = hf(ids).logits[0].float().log_softmax(-1)
        # token ids[t] is predicted at position t - 1
        nll = [-logp[len(ctx) + i - 1, tok].item() for i, tok in enumerate(end)]
        sums.append(sum(nll))
        means.append(sum(nll) / len(nll))
    return min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)


# ---------------------------------------------------------------- loading & rendering


def test_load_examples(examples):
    assert len(examples) == 8
    for ex in examples:
        assert isinstance(ex["label"], int) and 0 <= ex["label"] < 4
        assert len(ex["endings"]) == 4 and all(isinstance(e, str) for e in ex["endings"])
        assert ex["ctx"] == f"{ex['ctx_a']} {ex['ctx_b']}"
    assert [ex["label"] for ex in examples] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len(load_examples(str(ASSET), limit=3)) == 3


def test_render_shapes_and_mask(examples, enc):
    for ex in examples:
        tokens, mask, label = render(ex, enc)
        assert label == ex["label"]
        assert tokens.dtype == mask.dtype == torch.long
        assert tokens.shape == mask.shape and tokens.shape[0] == 4
        ctx = enc.encode(ex["ctx"])
        ends = [enc.encode(" " + e) for e in ex["endings"]]
        assert tokens.shape[1] == len(ctx) + max(len(e) for e in ends)
        for j, end in enumerate(ends):
            n = len(ctx) + len(end)
            assert tokens[j, :n].tolist() == ctx + end
            assert tokens[j, n:].eq(0).all()  # padding
            assert mask[j].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.shape[1] - n)
            # the masked tokens decode to exactly " " + ending
            assert enc.decode(tokens[j][mask[j].bool()].tolist()) == " " + ex["endings"][j]


def test_render_truncates_from_the_left(enc):
    ex = {"ctx": "word " * 100 + "and then", "label": 2,
          "endings": ["a short one.", "a somewhat longer ending here.", "x", "yes indeed"]}
    full, full_mask, _ = render(ex, enc)
    tokens, mask, label = render(ex, enc, max_len=16)
    assert label == 2 and tokens.shape[1] <= 16
    ctx = enc.encode(ex["ctx"])
    for j, ending in enumerate(ex["endings"]):
        end = enc.encode(" " + ending)
        row = (ctx + end)[-16:]
        assert tokens[j, : len(row)].tolist() == row  # kept the last 16 tokens
        assert mask[j].sum().item() == len(end)  # the ending is intact
        assert mask[j, len(row) - len(end): len(row)].eq(1).all()


# ---------------------------------------------------------------- errors


def test_missing_file_is_user_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="not found") as e:
        load_examples(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bad, what",
    [
        ("{not json", "not valid JSON"),
        ('{"ctx": "a", "label": 0, "endings": ["a", "b", "c"]}', "'endings'"),
        ('{"ctx": "a", "label": 7, "endings": ["a", "b", "c", "d"]}', "'label'"),
        ('{"label": 0, "endings": ["a", "b", "c", "d"]}', "'ctx'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_line_is_user_error(tmp_path, bad, what):
    good = ASSET.read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, good, bad, good]) + "\n")
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    msg = str(e.value)
    assert f"{path}:3" in msg and what in msg and "\n" not in msg


# ---------------------------------------------------------------- scoring


def test_evaluate_matches_hf_reference(models, examples, enc):
    ours, hf = models
    refs = [hf_reference(hf, ex, enc) for ex in examples]
    n = len(examples)
    want_acc = sum(s == ex["label"] for (s, _), ex in zip(refs, examples)) / n
    want_norm = sum(m == ex["label"] for (_, m), ex in zip(refs, examples)) / n
    got = evaluate(ours, examples, enc, "cpu")
    assert got == {"acc": want_acc, "acc_norm": want_norm, "n": n}
    # Pin down every prediction, not just the totals: relabel each example with the
    # reference's argmin; evaluate must then be right on all of them.
    by_mean = [dict(ex, label=m) for (_, m), ex in zip(refs, examples)]
    by_sum = [dict(ex, label=s) for (s, _), ex in zip(refs, examples)]
    assert evaluate(ours, by_mean, enc, "cpu")["acc_norm"] == 1.0
    assert evaluate(ours, by_sum, enc, "cpu")["acc"] == 1.0
    # ...and the predictions are not all the same (the check is not vacuous).
    assert len({m for _, m in refs}) > 1


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg, self.calls = inner, inner.cfg, 0

    def forward(self, idx):
        self.calls += 1
        return self.inner(idx)


def test_ranks_split_examples_and_run_equal_forwards(models, examples, enc, monkeypatch):
    ours, _ = models
    world = 3  # 8 examples -> 3, 3, 2
    full = evaluate(ours, examples, enc, "cpu")
    per_rank, calls = [], []
    for rank in range(world):
        m = CountingModel(ours)
        per_rank.append(evaluate(m, examples, enc, "cpu", rank=rank, world=world))
        calls.append(m.calls)
    assert [r["n"] for r in per_rank] == [3, 3, 2]
    assert calls == [3, 3, 3]  # rank 2 pads with one dummy forward
    # With a (stubbed) process group the counts are all-reduced into the global result.
    others = torch.tensor([[round(r["acc"] * r["n"]), round(r["acc_norm"] * r["n"]), r["n"]]
                           for r in per_rank[1:]]).sum(0)
    reduced = []

    def all_reduce(t, op=None):
        reduced.append(t.clone())
        t += others

    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                 all_reduce=all_reduce, ReduceOp=types.SimpleNamespace(SUM="sum"))
    monkeypatch.setattr(hellaswag, "dist", fake)
    got = evaluate(ours, examples, enc, "cpu", rank=0, world=world)
    assert len(reduced) == 1 and reduced[0][2].item() == 3
    assert got == full


def test_evaluate_truncates_long_examples(models, enc):
    ours, _ = models
    ex = {"ctx": "the cat sat on the mat " * 30, "label": 1,
          "endings": ["and slept.", "and purred softly.", "then left.", "forever."]}
    got = evaluate(ours, [ex], enc, "cpu")  # > block_size 64 without truncation
    assert got["n"] == 1


def test_evaluate_restores_training_mode(models, examples, enc):
    ours, _ = models
    ours.train()
    try:
        evaluate(ours, examples[:1], enc, "cpu")
        assert ours.training
    finally:
        ours.eval()

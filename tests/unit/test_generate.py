"""Generation: greedy decoding equals Hugging Face's for the same weights, the perplexity is
the model's own, and the CLI works on a run dir made by import_hf (offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.generate import continuation_nll, generate_samples
from trainer.model import GPT

ROOT = Path(__file__).resolve().parents[2]
BPE = ROOT.parent / "shared" / "data" / "gpt2.tiktoken"


def _tiny(seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=512)
    m = GPT(ModelConfig(**{**cfg, **over}))
    with torch.no_grad():  # larger logits, so greedy has no near-ties
        m.wte.weight.mul_(5.0)
    return m.eval()


def test_greedy_equals_hf_generate():
    pytest.importorskip("transformers")
    from trainer.hf import to_hf

    m = _tiny()
    h = to_hf(m)
    prompt = torch.tensor([[5, 17, 301, 42], [9, 9, 100, 7]])
    ours = m.generate(prompt, 20, top_k=1)
    theirs = h.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                        do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # temperature 0 is greedy too, and generate_samples returns the same tokens
    tokens, nll = generate_samples(m, prompt[0].tolist(), 20, 0.0, None, 2, seed=1)
    assert torch.equal(tokens, ours[:1].expand(2, -1))
    # the NLL of the continuation is the model's (checked against HF's logits)
    with torch.no_grad():
        lp = F.log_softmax(h(tokens).logits[:, 3:-1], dim=-1)
    ref = -lp.gather(-1, tokens[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(nll, ref, atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_respects_top_k():
    m = _tiny(seed=1)
    a, _ = generate_samples(m, [1, 2, 3], 12, 1.0, 5, 3, seed=7)
    b, _ = generate_samples(m, [1, 2, 3], 12, 1.0, 5, 3, seed=7)
    c, _ = generate_samples(m, [1, 2, 3], 12, 1.0, 5, 3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every sampled token is among the 5 likeliest given its prefix
    with torch.no_grad():
        logits = m(a[:, :-1])[:, 2:]
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, 3:, None]).any(-1).all()


def test_nll_beyond_block_size_uses_the_sampling_window():
    m = _tiny(seed=2, block_size=8)
    seq = m.generate(torch.tensor([[3, 1, 4]]), 15, top_k=1)  # 18 tokens > block_size 8
    nll = continuation_nll(m, seq, 3)
    ref = []
    with torch.no_grad():
        for t in range(3, seq.shape[1]):
            logits = m(seq[:, max(0, t - 8):t])[:, -1]
            ref.append(-F.log_softmax(logits, -1)[0, seq[0, t]])
    torch.testing.assert_close(nll[0], torch.stack(ref), atol=1e-5, rtol=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.generate", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_on_imported_run(tmp_path):
    pytest.importorskip("transformers")
    if not BPE.is_file():
        pytest.skip(f"{BPE} not found")
    from trainer import import_hf
    from trainer.hf import to_hf

    m = _tiny(seed=3, vocab_size=50257, block_size=64)
    to_hf(m).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert import_hf.main(["--hf", str(tmp_path / "hf"), "--run-dir", str(run)]) == 0
    r = _cli("--run-dir", str(run), "--prompt", "ROMEO:", "--max-tokens", "12",
             "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--num-samples", "2",
             "--tokenizer-file", str(BPE))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ROMEO:") == 2
    ppl = [float(x) for x in re.findall(r"perplexity: ([0-9.eE+-]+|nan|inf)", r.stdout)]
    assert len(ppl) == 2 and all(math.isfinite(p) and p >= 1.0 for p in ppl), r.stdout

    r = _cli("--run-dir", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr

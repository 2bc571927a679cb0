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

from helpers import BPE, side_by_side
from trainer.config import ModelConfig
from trainer.generate import continuation_nll, generate_samples
from trainer.model import GPT

ROOT = Path(__file__).resolve().parents[2]


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


def _clis(*runs: list[str]) -> list[subprocess.CompletedProcess]:
    """_cli for each argument list, side by side (independent CLI processes)."""
    return side_by_side(lambda args: _cli(*args), *runs)


def _imported_run(tmp_path, *args: str):
    """(a tiny GPT, a run dir holding it as a step-0 checkpoint through import_hf)."""
    pytest.importorskip("transformers")
    from trainer import import_hf
    from trainer.hf import to_hf

    m = _tiny(seed=3, vocab_size=50257, block_size=64)
    to_hf(m).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert import_hf.main(["--hf", str(tmp_path / "hf"), "--run-dir", str(run), *args]) == 0
    return m, run


@pytest.mark.usefixtures("shared")
def test_cli_on_imported_run(tmp_path):
    _, run = _imported_run(tmp_path)
    r, missing = _clis(
        ["--run-dir", str(run), "--prompt", "ROMEO:", "--max-tokens", "12", "--temperature",
         "0.8", "--top-k", "20", "--seed", "3", "--num-samples", "2", "--tokenizer-file",
         str(BPE)],
        ["--run-dir", str(tmp_path / "missing"), "--prompt", "x"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ROMEO:") == 2
    ppl = [float(x) for x in re.findall(r"perplexity: ([0-9.eE+-]+|nan|inf)", r.stdout)]
    assert len(ppl) == 2 and all(math.isfinite(p) and p >= 1.0 for p in ppl), r.stdout

    r = missing
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def _store_with_snapshots(url: str, models: dict[int, GPT]) -> None:
    """A capture store holding only weight snapshots (bf16), as a run writes them."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from capture.snapshot import snapshot_files
    from store.schema import Layout
    from store.writer import StoreWriter

    layout = Layout(n_seqs=1, seq_len=4, act_hooks={}, topk=1, attn_layers=[], n_heads=1,
                    attn_seqs=0, max_steps=10, world=1, source="train", attrs={})
    w = StoreWriter.create_or_open(url, layout)
    info = SimpleNamespace(rank=0, world=1, distributed=False, is_main=True,
                           device=torch.device("cpu"))
    for step, m in models.items():
        w.write_snapshot(step, snapshot_files(m, asdict(m.cfg), step, "bf16", info))
    w.close()


@pytest.mark.usefixtures("shared")
def test_cli_on_a_weight_snapshot(tmp_path):
    """--step N without a checkpoint of N samples from the weight snapshot of N in the
    run's store (and says so); greedy decoding is the bf16 weights' own."""
    from trainer import checkpoint
    from trainer.config import UserError
    from trainer.snapshots import load_model_at

    base, run = _imported_run(tmp_path, "--tokenizer-file", str(BPE))  # checkpoint at 0
    snap = _tiny(seed=4, vocab_size=50257, block_size=64)
    _store_with_snapshots(str(run / "capture.zarr"), {0: _tiny(seed=9, vocab_size=50257,
                                                               block_size=64), 5: snap})

    # step 0: the checkpoint wins over the snapshot of the same step (full precision)
    loaded = load_model_at(run, 0)
    assert loaded.source == "checkpoint" and "checkpoints/step_00000000" in loaded.where
    assert torch.equal(loaded.model.wte.weight, base.wte.weight)
    # step 5: the snapshot, bf16-rounded, through load_model_at; checkpoint.load_model
    # stays strict (checkpoints only: it never hands out rounded weights unasked)
    want = snap.to(torch.bfloat16).float().eval()
    loaded = load_model_at(run, 5)
    assert (loaded.source, loaded.step) == ("snapshot", 5)
    assert loaded.where == f"bf16 weight snapshot in {run / 'capture.zarr'}"
    assert loaded.cfg.model == snap.cfg
    for k, v in want.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    with pytest.raises(UserError, match="no complete checkpoint for step 5"):
        checkpoint.load_model(run, 5)

    # three CLI runs side by side: step 5 greedy, the latest step, a step with neither
    r, latest, neither = _clis(
        ["--run-dir", str(run), "--step", "5", "--prompt", "ROMEO:", "--max-tokens", "10",
         "--top-k", "1", "--ids", "--device", "cpu"],
        ["--run-dir", str(run), "--prompt", "x", "--max-tokens", "2", "--device", "cpu"],
        ["--run-dir", str(run), "--step", "3", "--prompt", "x"])
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"run {run} step 5 (bf16 weight snapshot in ") and "greedy" in first
    ids = [int(x) for x in re.search(r"^ids: (.*)$", r.stdout, re.M).group(1).split()]
    prompt = [33676, 4720, 25]  # "ROMEO:" in GPT-2's BPE
    assert ids[:3] == prompt and len(ids) == 13
    assert ids == want.generate(torch.tensor([prompt]), 10, top_k=1)[0].tolist()
    r = latest
    assert r.returncode == 0 and "step 0 (checkpoint " in r.stdout, r.stderr  # the latest

    # a step with neither: one line naming both
    r = neither
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: no checkpoint or weight snapshot for step 3 in {run} (checkpoint steps: 0; "
        f"snapshot steps: 0, 5)"), r.stderr

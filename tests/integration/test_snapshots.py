"""Weight snapshots of a real run: exported as a Hugging Face GPT-2 folder they compute the
activations the store captured at that step, sample what our own model samples, and load
whatever checkpoint.keep_last pruned.

The run: configs/tiny.toml (2 layers, bf16 snapshots) for 4 steps on CPU, summaries every 3
steps, checkpoints every 2 steps keeping the last one. So:
  captures   0F 1F 2F 3 4F   (F: full; 3 is a summary capture only)
  snapshots  0 1 2 4         (tiny.toml: snapshot_every = 50, so 0, 1, 2 and the last step)
  checkpoint 4               (2 was saved, then pruned by keep_last = 1)
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ahead, run_cli, run_clis
from store.reader import RunStore

pytestmark = pytest.mark.integration

TRAIN = ["--config", "configs/tiny.toml", "--max-steps", "4", "--eval.every=0",
         "--capture.every=3", "--capture.log_early=true", "--capture.full_every=1000",
         "--capture.snapshot_every=1000", "--checkpoint.every=2", "--checkpoint.keep_last=1",
         "--log.plot=false"]
RESID = "blocks.{}.hook_resid_post"
# How far the HF model (float32 computing from the bf16 snapshot) may be from the store's
# activations (the training model's float32 weights; stored as float16), as a fraction of
# the layer's largest |activation|. bf16 keeps 8 significant bits: each weight is off by at
# most 2^-9 of itself, and the residual stream (embeddings plus each block's output, each
# computed from rounded weights) by a few 2^-9 of its scale; float16 storage adds 2^-11.
# Measured here: ~2^-8.6 (3.4e-4 of max 0.134). 2^-7 allows 4x bf16's relative step;
# the snapshot of a neighbouring step is off by ~25% (checked below: the bound can fail).
BF16_TOL = 2.0 ** -7
# The float32 checkpoint of the same step against the store: float16 storage alone
# (2^-11 relative; measured 2^-11.2 of the max).
FP32_TOL = 2.0 ** -10


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def one_error_line(r: subprocess.CompletedProcess, *msgs: str) -> str:
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for m in msgs:
        assert m in lines[0], lines[0]
    return lines[0]


@ahead("snapshot_runs")
def _snapshot_runs(data: Path, base: Path) -> dict:
    extra = {"bf16": [], "fp16": ["--capture.snapshot_dtype=fp16"]}
    results = run_clis(*(["-m", "trainer", "--data", str(data), "--run-dir", str(base / k),
                          *TRAIN, *x] for k, x in extra.items()))
    return {k: (base / k, r) for k, r in zip(extra, results)}


@pytest.fixture(scope="module")
def snapshot_runs(runs_ahead, shakespeare_data) -> dict[str, Path]:
    """The run (bf16 snapshots) and the same with fp16 snapshots, trained side by side (and
    ahead: helpers.ahead)."""
    runs = runs_ahead.take("snapshot_runs")
    for _, r in runs.values():
        ok(r)
    return {k: run for k, (run, _) in runs.items()}


@pytest.fixture(scope="module")
def run(snapshot_runs) -> Path:
    return snapshot_runs["bf16"]


@pytest.fixture(scope="module")
def store(run) -> RunStore:
    return RunStore(str(run / "capture.zarr"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """step -> the Hugging Face folder capture.export wrote from its weight snapshot."""
    out = tmp_path_factory.mktemp("hf")
    made: dict[int, Path] = {}

    def get(step: int) -> Path:
        if step not in made:  # the first call exports both steps the tests read, side by side
            steps = [s for s in sorted({step, 2, 4}) if s not in made]
            results = run_clis(*(["-m", "capture.export", "--run-dir", str(run), "--step",
                                  str(s), "--format", "hf", "--out", str(out / f"step_{s}")]
                                 for s in steps))
            for s, r in zip(steps, results):
                d = out / f"step_{s}"
                ok(r)
                assert r.stdout.strip() == str(d)
                assert "warning" not in r.stderr and "no tokenizer" not in r.stderr, r.stderr
                made[s] = d
        return made[step]

    return get


def hf_model(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(
        folder, torch_dtype=torch.float32).float().eval()


def test_the_run_has_what_the_tests_need(run, store):
    from trainer import checkpoint

    assert store.tiers() == {0: ["summary", "full"], 1: ["summary", "full"],
                             2: ["summary", "full"], 3: ["summary"], 4: ["summary", "full"]}
    assert store.snapshot_steps() == [0, 1, 2, 4]
    assert checkpoint.list_complete(run) == [4]  # 2 was pruned by keep_last = 1
    meta = json.loads(store.snapshot_file(2, "config.json"))
    assert meta["dtype"] == "bf16" and meta["step"] == 2 and meta["model"]["n_layer"] == 2


def test_list_shows_tiers_and_snapshots(run):
    r = ok(run_cli(["-m", "capture.export", "--list", "--run-dir", str(run)]))
    assert "steps: 5 captured (4 full): 0F, 1F, 2F, 3, 4F\n" in r.stdout
    assert "snapshots: 0, 1, 2, 4 " in r.stdout
    assert "statistics only (1): blocks.0.mlp.hook_post [256]" in r.stdout


def _resid(store: RunStore, layer: int, step: int) -> torch.Tensor:
    return torch.from_numpy(store.activations(RESID.format(layer), step).astype(np.float32))


def _hf_block_outputs(hf, tokens: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """(each block's output, before the final LayerNorm), and HF's hidden_states."""
    outs: list[torch.Tensor] = []

    def keep(_mod, _inp, out):
        outs.append((out[0] if isinstance(out, tuple) else out).detach())

    handles = [b.register_forward_hook(keep) for b in hf.transformer.h]
    try:
        with torch.no_grad():
            res = hf(tokens, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return outs, res.hidden_states


@pytest.mark.parametrize("step", [2, 4])
def test_hf_export_computes_the_stored_activations(run, store, exported, step):
    """Steps 2 (its checkpoint pruned) and 4 (also a checkpoint): full captures with a
    snapshot. HF's hidden_states[l + 1] is block l's output, but the last one has ln_f
    applied: the layers before the last compare directly, the last through a hook on
    HF's last block (and hidden_states[L] is checked to be ln_f of it)."""
    from trainer.snapshots import load_snapshot

    hf = hf_model(exported(step))
    tokens = torch.from_numpy(np.asarray(store.tokens(step))).long()
    assert tokens.shape == (store.n_seqs, store.seq_len)
    L = hf.config.n_layer
    assert L == store.n_layers == 2
    blocks, hidden = _hf_block_outputs(hf, tokens)
    assert len(hidden) == L + 1
    ours, cfg, _ = load_snapshot(store, step)
    with torch.no_grad():
        _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_post"))
        ours_logits = ours(tokens)
        hf_logits = hf(tokens).logits
    for layer in range(L):
        want = _resid(store, layer, step)
        got = hidden[layer + 1] if layer < L - 1 else blocks[layer]
        tol = BF16_TOL * want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= tol, f"layer {layer}: {err:.3g} > {tol:.3g}"
        # our model from the same snapshot: the same float32 numbers, up to summation order
        torch.testing.assert_close(got, cache[RESID.format(layer)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(blocks[layer], got, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(hidden[L], hf.transformer.ln_f(blocks[L - 1]), atol=1e-5,
                                   rtol=1e-5)
    torch.testing.assert_close(hf_logits, ours_logits, atol=1e-4, rtol=1e-4)

    # the bound can fail: the previous snapshot (step 1 or 2) is far outside it
    prev = {2: 1, 4: 2}[step]
    other, _, _ = load_snapshot(store, prev)
    with torch.no_grad():
        _, oc = other.run_with_cache(tokens, names_filter=RESID.format(0))
    want = _resid(store, 0, step)
    assert (oc[RESID.format(0)] - want).abs().max().item() > 4 * BF16_TOL * want.abs().max()


# An fp16 snapshot (capture.snapshot_dtype = fp16): 11 significant bits, so each weight is
# off by at most 2^-12 of itself; the activations by a few 2^-12 of their scale, and their
# float16 storage adds 2^-11. 2^-9 of the layer's largest |activation| is fp16 tolerance.
FP16_TOL = 2.0 ** -9


def test_fp16_snapshot_export_computes_the_stored_activations(snapshot_runs, tmp_path):
    run = snapshot_runs["fp16"]  # TRAIN with capture.snapshot_dtype = fp16
    rs = RunStore(str(run / "capture.zarr"))
    assert json.loads(rs.snapshot_file(4, "config.json"))["dtype"] == "fp16"
    out = tmp_path / "hf"
    ok(run_cli(["-m", "capture.export", "--run-dir", str(run), "--step", "4", "--format",
                "hf", "--out", str(out)]))
    hf = hf_model(out)
    tokens = torch.from_numpy(np.asarray(rs.tokens(4))).long()
    blocks, hidden = _hf_block_outputs(hf, tokens)
    for layer in range(hf.config.n_layer):
        want = _resid(rs, layer, 4)
        got = hidden[layer + 1] if layer < hf.config.n_layer - 1 else blocks[layer]
        err, tol = (got - want).abs().max().item(), FP16_TOL * want.abs().max().item()
        assert err <= tol, f"layer {layer}: {err:.3g} > {tol:.3g}"


def test_checkpoint_is_closer_than_the_snapshot(run, store):
    """At step 4 the float32 checkpoint computes the stored activations to float16's
    precision: the snapshot's bf16 rounding is what BF16_TOL allows for."""
    from trainer.snapshots import load_model_at

    loaded = load_model_at(run, 4)
    assert loaded.source == "checkpoint"
    tokens = torch.from_numpy(np.asarray(store.tokens(4))).long()
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens,
                                               names_filter=lambda n: n.endswith("resid_post"))
    for layer in range(2):
        want = _resid(store, layer, 4)
        err = (cache[RESID.format(layer)] - want).abs().max().item()
        assert err <= FP32_TOL * want.abs().max().item(), (layer, err)


def test_greedy_generation_equals_hf(run, exported):
    """trainer.generate at step 2 (no checkpoint left: the snapshot) and HF's greedy
    generate from the exported folder give the same tokens."""
    transformers = pytest.importorskip("transformers")
    step = 2
    r = ok(run_cli(["-m", "trainer.generate", "--run-dir", str(run), "--step", str(step),
                    "--top-k", "1", "--max-tokens", "20", "--prompt", "ROMEO:", "--ids",
                    "--device", "cpu"]))
    first = r.stdout.splitlines()[0]
    assert f"step {step} (bf16 weight snapshot in {run / 'capture.zarr'})" in first, first
    ours = [int(x) for x in re.search(r"^ids: (.*)$", r.stdout, re.M).group(1).split()]

    folder = exported(step)
    tok = transformers.AutoTokenizer.from_pretrained(folder)  # the exported tokenizer files
    prompt = tok("ROMEO:")["input_ids"]
    assert ours[:len(prompt)] == prompt and len(ours) == len(prompt) + 20
    hf = hf_model(folder)
    x = torch.tensor([prompt])
    with torch.no_grad():
        g = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                        max_new_tokens=20, pad_token_id=tok.eos_token_id, output_scores=True,
                        return_dict_in_generate=True)
    theirs = g.sequences[0].tolist()
    # Compare up to the first near-tie between the two likeliest tokens, where float32
    # summation order may legitimately pick the other one (none expected: the margins of a
    # 50257-way argmax are ~1e-2).
    n = 20
    for i, s in enumerate(g.scores):
        top2 = s[0].float().topk(2).values
        if (top2[0] - top2[1]).item() < 1e-4:
            n = i
            break
    assert n > 0, "the first generated token is a near-tie: nothing to compare"
    assert ours[:len(prompt) + n] == theirs[:len(prompt) + n]
    assert len(theirs) == len(prompt) + 20


def test_pruned_checkpoint_loads_from_its_snapshot(run, store, tmp_path):
    from trainer import checkpoint
    from trainer.snapshots import load_model_at, load_snapshot

    loaded = load_model_at(run, 2)
    assert (loaded.source, loaded.step) == ("snapshot", 2)
    snap, _, _ = load_snapshot(store, 2)
    assert loaded.cfg.model == snap.cfg and checkpoint.list_complete(run) == [4]
    for k, v in snap.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # and step 1, never a checkpoint at all
    assert load_model_at(run, 1).source == "snapshot"
    # trainer.export_hf says which it used
    r2, r4 = run_clis(["-m", "trainer.export_hf", "--run-dir", str(run), "--step", "2",
                       "--out", str(tmp_path / "s2")],
                      ["-m", "trainer.export_hf", "--run-dir", str(run), "--step", "4",
                       "--out", str(tmp_path / "c4")])
    assert "step 2 from bf16 weight snapshot in" in ok(r2).stdout, r2.stdout
    assert "step 4 from checkpoint " in ok(r4).stdout, r4.stdout
    hf = hf_model(tmp_path / "s2")
    x = torch.from_numpy(np.asarray(store.tokens(2))[:2]).long()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, snap(x), atol=1e-4, rtol=1e-4)


def test_a_step_without_a_snapshot_is_one_error_line(run, tmp_path):
    """Step 3: a summary capture, no snapshot, no checkpoint."""
    snaps = "0, 1, 2, 4"
    tools = (("trainer.generate", ["--prompt", "x"]),
             ("trainer.export_hf", ["--out", str(tmp_path / "hf")]))
    # the four attempts side by side (none may write anything)
    hf, *by_tool, acts = run_clis(
        ["-m", "capture.export", "--run-dir", str(run), "--step", "3", "--format", "hf",
         "--out", str(tmp_path / "hf")],
        *(["-m", tool, "--run-dir", str(run), "--step", "3", *extra] for tool, extra in tools),
        # the activation formats: step 3 is a summary capture, the nearest full ones named
        ["-m", "capture.export", "--run-dir", str(run), "--step", "3", "--out",
         str(tmp_path / "acts")])
    one_error_line(hf, "no weight snapshot at step 3", f"snapshot steps: {snaps}")
    for r in by_tool:
        one_error_line(r, "no checkpoint or weight snapshot for step 3",
                       "checkpoint steps: 4", f"snapshot steps: {snaps}")
    assert not (tmp_path / "hf").exists()
    one_error_line(acts, "step 3 has a summary capture only", "before 2", "after 4")
    assert not (tmp_path / "acts").exists()

"""capture.export on a store the trainer wrote: every format holds the store's activations
and the probe set's tokens; the seeds' file holds the block-4 output the model computes.

The run's captures (summary every 3 steps, full every 6, both with the early steps 1, 2, 4
below their cadence, step 0 and the last step): 0F 1F 2F 3 4F 6F, where F is a full
capture (activations, attention) and 3 a summary capture (statistics only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ahead, run_cli
from store.reader import RunStore

pytestmark = pytest.mark.integration

SEEDS = "blocks.4.hook_resid_post"
TRAIN = ["--max-steps", "6", "--model.n_layer=5", "--model.n_head=2", "--model.n_embd=32",
         "--model.block_size=32", "--train.micro_batch_size=4",
         "--train.global_batch_tokens=128", "--eval.every=0", "--capture.every=3",
         "--capture.full_every=6",
         "--capture.probe_seqs=4", "--log.plot=false"]


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@ahead("trained")
def _train(data: Path, base: Path):
    run = base / "run"
    return run, run_cli(["-m", "trainer", "--data", str(data), "--run-dir", str(run), *TRAIN])


@pytest.fixture(scope="module")
def trained(runs_ahead, shakespeare_data) -> Path:
    """The run (TRAIN), trained ahead (helpers.ahead)."""
    run, r = runs_ahead.take("trained")
    ok(r)
    assert (run / "capture.zarr").is_dir()
    return run


def test_list(trained):
    r = ok(run_cli(["-m", "capture.export", "--list", "--run-dir", str(trained)]))
    rs = RunStore(str(trained / "capture.zarr"))
    steps = [int(s) for s in rs.steps()]
    assert steps == [0, 1, 2, 3, 4, 6] and list(rs.steps("full")) == [0, 1, 2, 4, 6]
    assert "steps: 6 captured (5 full): 0F, 1F, 2F, 3, 4F, 6F\n" in r.stdout
    assert f"snapshots: {', '.join(map(str, rs.snapshot_steps()))} " in r.stdout
    for hook, D in rs.act_hooks.items():
        assert f"{hook}  " in r.stdout and f"[4, 32, {D}]" in r.stdout
    assert SEEDS in rs.act_hooks
    assert "status: finished" in r.stdout and "source: probe" in r.stdout


@pytest.mark.parametrize("fmt", ["pt", "npy", "safetensors"])
def test_export_each_format(trained, tmp_path, fmt):
    step = 4  # a full capture
    ok(run_cli(["-m", "capture.export", "--run-dir", str(trained), "--step", str(step),
                "--format", fmt, "--out", str(tmp_path)]))
    rs = RunStore(str(trained / "capture.zarr"))
    probe = rs.probe_tokens()
    assert probe.shape == (4, 32) and (rs.tokens(step) == probe).all()
    d = tmp_path / f"step_{step}"
    if fmt == "npy":
        tok = np.load(d / "tokens.npy")
        assert np.array_equal(tok, probe)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"{h}.{fmt}" for h in rs.act_hooks] + (["tokens.npy"] if fmt == "npy" else []))
    for hook, D in rs.act_hooks.items():
        want = rs.activations(hook, step)
        assert want.shape == (4, 32, D) and np.isfinite(want).all()
        if fmt == "pt":
            obj = torch.load(d / f"{hook}.pt", weights_only=True)
            got, tok = obj["activations"].numpy(), obj["tokens"].numpy()
            assert (obj["hook"], obj["step"], obj["source"]) == (hook, step, "probe")
        elif fmt == "npy":
            got = np.load(d / f"{hook}.npy")
        else:
            from safetensors import safe_open
            with safe_open(d / f"{hook}.safetensors", framework="np") as f:
                got, tok = f.get_tensor("activations"), f.get_tensor("tokens")
                assert f.metadata()["hook"] == hook and f.metadata()["step"] == str(step)
        assert got.dtype == np.float16 and np.array_equal(got, want), hook
        assert tok.dtype == np.int64 and np.array_equal(tok, probe)
    seeds = torch.load(tmp_path / f"act_block4_output_step_{step}.pt", weights_only=True)
    assert np.array_equal(seeds["activations"].numpy(), rs.activations(SEEDS, step))
    assert np.array_equal(seeds["input_ids"].numpy(), probe)


def test_seeds_file_is_the_models_block4_output(trained, tmp_path):
    """At the final step (which has a checkpoint) the exported block-4 output is what the
    trained model computes on the exported input ids."""
    from trainer import checkpoint

    ok(run_cli(["-m", "capture.export", "--run-dir", str(trained), "--step", "6",
                "--hook", "blocks.4.*", "--out", str(tmp_path)]))
    seeds = torch.load(tmp_path / "act_block4_output_step_6.pt", weights_only=True)
    model, _, _ = checkpoint.load_model(trained, 6)
    with torch.no_grad():
        _, cache = model.eval().run_with_cache(seeds["input_ids"], names_filter=SEEDS)
    np.testing.assert_allclose(seeds["activations"].float().numpy(), cache[SEEDS].numpy(),
                               atol=2e-3, rtol=2e-3)


def test_uncaptured_step_of_a_real_run(trained):
    r = run_cli(["-m", "capture.export", "--run-dir", str(trained), "--step", "5"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: step 5 was not captured"), r.stderr
    assert "before: 4" in lines[0] and "after: 6" in lines[0]


@pytest.mark.parametrize("fmt", ["pt", "saelens"])
def test_summary_step_of_a_real_run(trained, tmp_path, fmt):
    """Step 3 has statistics only: an activation export names the nearest full captures."""
    r = run_cli(["-m", "capture.export", "--run-dir", str(trained), "--step", "3",
                 "--format", fmt, "--hook", SEEDS, "--out", str(tmp_path / "x")])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: step 3 has a summary capture only; its activations and "
                     "attention are kept at full captures: nearest before 2, after 4"], r.stderr
    assert not (tmp_path / "x").exists()

"""What a capture stores does not depend on how the run was launched (one process or FSDP,
fp32 or bf16, meta init or not), and compile runs with capture and evaluation. Each run goes
through the user's CLI on gloo (CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from helpers import (ROOT, ahead, env, ok, read_metrics, run_cli, run_clis, torchrun,
                     train_args)
from store.reader import RunStore

pytestmark = pytest.mark.integration

# Every tier at step 0 (the same initial weights in every launch), fp16 snapshots (finer
# than bf16: a snapshot read from a bf16 copy would show), the logit lens on every token.
CAPTURE = ["--capture.every=1", "--capture.full_every=1", "--capture.snapshot_every=1",
           "--capture.snapshot_dtype=fp16", "--capture.probe_seqs=4",
           "--capture.probe_len=32", "--capture.lens_tokens=128", "--capture.attn_seqs=2"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@ahead("launches")
def _launch(data: Path, base: Path) -> dict:
    runs = {"one_fp32": (False, []), "fsdp_fp32_meta": (True, ["--parallel.meta_init=true"]),
            "fsdp_bf16": (True, ["--train.dtype=bf16"])}
    launch = []
    for name, (fsdp, extra) in runs.items():
        args = train_args(data, base / name, *CAPTURE, *extra, steps=1)
        launch.append(torchrun(2) + args[1:] if fsdp else args)
    return {name: (base / name, r) for name, r in zip(runs, run_clis(*launch))}


@pytest.fixture(scope="module")
def launches(runs_ahead, shakespeare_data):
    """One step of each launch, side by side, trained ahead (helpers.ahead)."""
    runs = runs_ahead.take("launches")
    for _, r in runs.values():
        ok(r)
    return {name: run for name, (run, _) in runs.items()}


def test_initial_weights_and_snapshots_do_not_depend_on_the_launch(launches):
    snaps = {k: load(RunStore(str(r / "capture.zarr")).snapshot_file(0))
             for k, r in launches.items()}
    ref = snaps["one_fp32"]
    for name in ("fsdp_fp32_meta", "fsdp_bf16"):
        assert snaps[name].keys() == ref.keys()
        for k in ref:  # bit for bit: gathered from the fp32 shards, whatever the policy
            assert np.array_equal(snaps[name][k], ref[k]), (name, k)
    one, meta = read_metrics(launches["one_fp32"]), read_metrics(launches["fsdp_fp32_meta"])
    assert meta[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-6)


def test_capture_agrees_across_launches(launches):
    rs = {k: RunStore(str(r / "capture.zarr")) for k, r in launches.items()}
    ref = rs["one_fp32"]
    for name, tol in (("fsdp_fp32_meta", 1e-5), ("fsdp_bf16", 2e-2)):
        r = rs[name]
        assert list(r.steps("full")) == list(ref.steps("full")) == [0, 1]
        for hook in ref.stat_hooks:
            for stat in ("mean", "std", "max"):
                assert _rel(r.stats_at(hook, 0)[stat], ref.stats_at(hook, 0)[stat]) < tol, \
                    (name, hook, stat)
        for score in ref.head_score_names:
            assert np.abs(r.head_scores(score)[1][0] - ref.head_scores(score)[1][0]).max() \
                < tol, (name, score)
        assert _rel(r.logit_lens()[1][0], ref.logit_lens()[1][0]) < tol
        assert _rel(r.token_loss(0)[:, 1:], ref.token_loss(0)[:, 1:]) < tol
        for layer in ref.attn_layers:  # patterns computed in fp32 in every launch
            assert np.abs(r.attention(layer, 0, 1) - ref.attention(layer, 0, 1)).max() < tol
        for layer in ref.dla_layers:  # from the fp32 weights: as close as fp32 sums allow
            for n in (0, 7):
                a, b = r.neuron_logits(layer, 0, n), ref.neuron_logits(layer, 0, n)
                np.testing.assert_allclose(a["top_value"], b["top_value"], rtol=1e-4,
                                           atol=1e-6)


@ahead("compiled")
def _compiled(data: Path, base: Path):
    run = base / "run"
    args = train_args(data, run, "--parallel.compile=true", "--capture.every=2",
                      "--capture.full_every=2", "--capture.snapshot_every=4",
                      "--capture.log_early=false", "--capture.probe_seqs=4",
                      "--capture.probe_len=32", "--eval.every=3", "--eval.val_batches=2",
                      "--eval.sample_tokens=8", steps=6)
    return run, subprocess.run([sys.executable, *torchrun(2), *args[1:]], cwd=ROOT,
                               env=env(TORCH_LOGS="recompiles"), capture_output=True,
                               text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(runs_ahead, shakespeare_data):
    """(run dir, process) of 6 steps with parallel.compile on 2 ranks, capture and
    evaluation, recompiles logged (TORCH_LOGS); trained ahead (helpers.ahead)."""
    return runs_ahead.take("compiled")


def test_compile_with_capture_and_eval_recompiles_nothing(compiled):
    """torch.compile per block under FSDP: the capture's hooked forwards and evaluation run
    eager, so only the first step compiles and nothing recompiles."""
    run, r = compiled
    ok(r)
    assert "Recompiling" not in r.stderr, r.stderr[-3000:]
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 7))
    assert [s for s in m if m[s].get("compile")] == [1]  # the compile is marked
    assert "val_loss" in m[3] and "val_loss" in m[6]
    rs = RunStore(str(run / "capture.zarr"))
    assert list(rs.steps("full")) == [0, 2, 4, 6] and rs.snapshot_steps() == [0, 4, 6]


SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch.distributed.tensor import DTensor
    from capture.collectives import reshard
    from trainer import dist as tdist
    from trainer.config import ModelConfig, ParallelConfig
    from trainer.model import GPT
    from trainer.parallelize import parallelize

    info = tdist.init("cpu")
    torch.manual_seed(0)
    model = parallelize(GPT(ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=8,
                                        vocab_size=64)), ParallelConfig(), info, "fp32")
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
    sharded = lambda p: isinstance(p, DTensor)
    # after a forward: the root (needed again by backward) and the last block stay gathered,
    # the other blocks are resharded
    after_forward = [sharded(model.wte.weight), sharded(model.blocks[0].mlp.c_fc.weight),
                     sharded(model.blocks[2].mlp.c_fc.weight)]
    reshard(model)
    after_reshard = all(sharded(p) for p in model.parameters())
    with open(f"{sys.argv[1]}/rank{info.rank}.txt", "w") as f:
        f.write(f"{after_forward} {after_reshard}")
    tdist.shutdown(info)
""")


@ahead("probed", data=False)
def _probed(_data, base: Path):
    script = base / "probe_fsdp.py"
    script.write_text(SCRIPT)
    # 600 s: a bound for a hang only (it may run beside the multi-node SLURM jobs).
    return base, run_cli(torchrun(2) + [str(script), str(base)], timeout=600)


@pytest.fixture(scope="module")
def probed(runs_ahead):
    """(folder, process) of SCRIPT on 2 ranks, run ahead (helpers.ahead)."""
    return runs_ahead.take("probed")


def test_root_stays_gathered_after_forward_and_reshard_frees_it(probed):
    out, r = probed
    ok(r)
    for rank in (0, 1):  # sharded after a forward? root, first block, last block; then all
        assert (out / f"rank{rank}.txt").read_text() == "[False, True, False] True"

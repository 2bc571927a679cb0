"""Training end to end: two real gloo processes against one, exact resume after a signal and
after kill -9, torn checkpoints ignored. Every run goes through the user's CLI."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers import (STEPS, ahead, losses, ok, popen, read_metrics, run_cli, run_clis,
                     steps_logged, torchrun, train_args, wait_for)
from trainer import checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """Uninterrupted runs: one process, and two FSDP ranks with the same global batch
    (conftest.py's, shared with test_resume_schedule.py: captures every 3 steps, which
    leave the training as it is)."""
    return uninterrupted


def test_two_rank_fsdp_matches_one_process_and_learns(reference):
    one, two = losses(reference["one"]), losses(reference["two"])
    assert len(one) == len(two) == STEPS
    assert one == pytest.approx(two, rel=0, abs=2e-4), (one, two)
    assert max(two[-3:]) < two[0] - 1.0  # loss falls (from ~10.8, a uniform guess)
    m = read_metrics(reference["two"])
    assert all(m[s]["tokens_per_s"] > 0 and m[s]["grad_norm"] > 0 for s in m)
    # resolved config saved, checkpoints complete
    assert (reference["two"] / "config.toml").is_file()
    assert checkpoint.list_complete(reference["two"]) == [3, 6, 9, 12]


def test_sigterm_checkpoints_and_resume_is_exact(shakespeare_data, reference, tmp_path):
    """SIGTERM to torchrun reaches both ranks; they agree to stop at the same step boundary,
    checkpoint there and exit cleanly, and the resumed run continues bit for bit. (torchrun
    itself exits 1 after a SIGTERM whatever its workers do: it reports the signal.)"""
    run = tmp_path / "run"
    # Slow the run down a little (more steps) so the signal lands mid-run.
    p = popen(torchrun(2) + train_args(shakespeare_data, run, "--checkpoint.every=1000",
                                       steps=STEPS)[1:])
    wait_for(lambda: steps_logged(run) >= 2, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert "stopped on signal SIGTERM" in out, err
    stopped = checkpoint.latest_step(run)
    assert stopped is not None and 2 <= stopped < STEPS, (stopped, out)
    assert "stopped on signal" in out
    ok(run_cli(torchrun(2) + train_args(shakespeare_data, run, "--resume",
                                        "--checkpoint.every=1000")[1:]))
    assert losses(run) == losses(reference["two"])  # exactly


def test_kill9_then_resume_is_exact_and_torn_checkpoints_are_ignored(
        shakespeare_data, reference, tmp_path):
    run = tmp_path / "run"
    p = popen(train_args(shakespeare_data, run, "--checkpoint.every=2"))
    wait_for(lambda: checkpoint.latest_step(run) is not None and steps_logged(run) >= 5, p)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    last = checkpoint.latest_step(run)
    assert last is not None and last < STEPS
    # A checkpoint cut off mid-write: a later step's folder without meta.json, and a hidden
    # temporary folder. Neither may be picked.
    torn = checkpoint.step_dir(run, last + 1)
    torn.mkdir()
    (torn / ".metadata").write_bytes(b"\x00garbage")
    (run / "checkpoints" / f".step_{last + 2:08d}.tmp").mkdir()
    assert checkpoint.latest_step(run) == last
    r = ok(run_cli(train_args(shakespeare_data, run, "--resume", "--checkpoint.every=2")))
    assert f"resumed from step {last}" in r.stdout
    assert losses(run) == losses(reference["one"])  # exactly, one record per step


MODES = {
    "grad": ["--parallel.sharding=grad"],
    "none": ["--parallel.sharding=none"],
    "hybrid": ["--parallel.sharding=hybrid", "--parallel.shard_size=2"],
    "activation-checkpointing": ["--parallel.activation_checkpointing=true"],
    "meta-init": ["--parallel.meta_init=true"],
    # (compile alone: test_launch.py, with capture and evaluation)
    "compile-activation-checkpointing": ["--parallel.compile=true",
                                         "--parallel.activation_checkpointing=true"],
}
# Meta-device init, bf16 mixed precision, validation, the text sample and HellaSwag, 8 steps.
META_BF16_EVAL = ["--parallel.meta_init=true", "--train.dtype=bf16", "--eval.every=4",
                  "--eval.val_batches=2", "--eval.sample_tokens=8", "--log.plot=true",
                  "--eval.hellaswag_file=tests/assets/hellaswag_tiny.jsonl"]


@ahead("fsdp_runs")
def _fsdp_runs(data: Path, base: Path) -> dict:
    args = {name: train_args(data, base / name, *extra, steps=4)
            for name, extra in MODES.items()}
    args["meta-bf16-eval"] = train_args(data, base / "meta-bf16-eval", *META_BF16_EVAL,
                                        steps=8)
    results = run_clis(*(torchrun(2) + a[1:] for a in args.values()))
    return {name: (base / name, r) for name, r in zip(args, results)}


@pytest.fixture(scope="module")
def fsdp_runs(runs_ahead, shakespeare_data):
    """The 2-rank runs of each parallel setting (4 steps) and of META_BF16_EVAL (8 steps),
    two launches at a time, trained ahead (helpers.ahead); each test checks its own run's
    exit status: name -> (run dir, the finished process)."""
    return runs_ahead.take("fsdp_runs")


@pytest.mark.parametrize("mode", list(MODES))
def test_sharding_modes_give_the_same_training(fsdp_runs, reference, mode):
    run, r = fsdp_runs[mode]
    ok(r)
    assert losses(run) == pytest.approx(losses(reference["one"])[:4], rel=0, abs=2e-4)


def test_meta_init_bf16_and_eval_run_under_fsdp(fsdp_runs):
    """Meta-device init allocates only shards; bf16 mixed precision trains; validation and
    the text sample run on both ranks (each forward is a collective) and reach the log."""
    run, r = fsdp_runs["meta-bf16-eval"]
    ok(r)
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 9))
    assert m[8]["loss"] < m[1]["loss"] - 0.5
    assert "val_loss" in m[4] and "val_loss" in m[8] and m[8]["val_loss"] < m[4]["val_loss"]
    assert isinstance(m[8]["sample"], str) and "--- sample at step 8 ---" in r.stdout
    assert 0.0 <= m[8]["hellaswag_acc_norm"] <= 1.0 and "hellaswag" in r.stdout
    assert (run / "loss.png").stat().st_size > 1000

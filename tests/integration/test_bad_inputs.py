"""Bad input: one clear line on stderr, a non-zero exit, and nothing lost."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from helpers import BPE, CORPUS, losses, ok, run_cli, run_clis, torchrun, train_args
from trainer import checkpoint

pytestmark = pytest.mark.integration


def fails_with(r, msg: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert msg in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


BAD_CONFIGS = [
    (["--model.n_layerz=3"], "unknown option --model.n_layerz=3; did you mean --model.n_layer?"),
    (["--optim.lr=fast"], "--optim.lr: could not convert string to float: 'fast'"),
    (["--model.n_embd=30", "--model.n_head=4"],
     "model.n_embd (30) must be divisible by model.n_head (4)"),
    (["--train.global_batch_tokens=100"], "must be a multiple of micro_batch_size x seq_len"),
    (["--parallel.cpu_offload=true"], "with no GPU it has nothing to offload"),
    (["--capture.hooks=blocks.7.mlp.hook_post"], "matches no hook of this model; valid:"),
    # values outside their meaning: refused at load, before anything is written
    (["--optim.lr=-0.003"], "optim.lr must be positive, got -0.003"),
    (["--optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be in [0, 1], got 1.5"),
    (["--optim.beta2=1.0"], "optim.beta2 must be in [0, 1), got 1.0"),
    (["--optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0"),
    (["--checkpoint.every=0"], "checkpoint.every must be positive"),
    (["--train.grad_clip=0"], "train.grad_clip must be positive"),
    (["--log.every=0"], "log.every must be positive"),
]


def test_bad_config(shakespeare_data, tmp_path):
    """Each refused in one line (exit 2) before anything is written. Two at a time: each is
    one process, most of them answered before torch is imported (trainer/launch.py)."""
    runs = [tmp_path / f"run{i}" for i in range(len(BAD_CONFIGS))]
    results = run_clis(*(train_args(shakespeare_data, run, *extra)
                         for run, (extra, _) in zip(runs, BAD_CONFIGS)))
    for run, (extra, msg), r in zip(runs, BAD_CONFIGS, results):
        fails_with(r, msg)
        assert not run.exists(), extra  # nothing written for a run that never started


def test_bad_config_file(tmp_path, shakespeare_data):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nn_layer = 'two'\n")
    fails_with(run_cli(["-m", "trainer", "--config", str(cfg), "--data", str(shakespeare_data),
                        "--run-dir", str(tmp_path / "r")]),
               "model.n_layer expects int, got str")


def test_missing_data_dir(tmp_path):
    fails_with(run_cli(train_args(tmp_path / "nope", tmp_path / "run")), "not found")


@pytest.mark.usefixtures("shared")
def test_data_shorter_than_one_sequence(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be.\n\nThat is the question.\n")
    data = tmp_path / "short"
    ok(run_cli(["-m", "trainer.prepare", "--text", str(text), "--out", str(data),
                "--tokenizer-file", str(BPE), "--val-fraction", "0.5", "--workers", "1"]))
    fails_with(run_cli(train_args(data, tmp_path / "run")), "fewer than one sequence")


def test_resume_with_another_model_shape_changes_nothing(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    ok(run_cli(train_args(shakespeare_data, run, steps=3)))
    before = tree_digest(run)
    fails_with(run_cli(train_args(shakespeare_data, run, "--resume", "--model.n_layer=3")),
               "was made with a model of n_layer=2")
    # and a second run into a used run dir without --resume is refused, not overwritten
    fails_with(run_cli(train_args(shakespeare_data, run)), "pass --resume")
    assert tree_digest(run) == before


def test_non_finite_loss_stops_with_last_good_checkpoint(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli(train_args(shakespeare_data, run, "--optim.lr=1e6", "--optim.warmup_steps=0",
                           "--train.grad_clip=1e9", "--checkpoint.every=1", steps=30))
    fails_with(r, "non-finite training at step")
    from trainer import checkpoint
    last = checkpoint.latest_step(run)
    assert f"Last good checkpoint: step {last}" in r.stderr


def test_outputs_that_cannot_be_made(shakespeare_data, tmp_path):
    """A run dir or a data folder where none can be made: one line naming the flag, and
    nothing written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    fails_with(run_cli(train_args(shakespeare_data, a_file)), "--run-dir")
    fails_with(run_cli(train_args(shakespeare_data, a_file / "run")), "is a file")
    fails_with(run_cli(train_args(shakespeare_data, Path("/proc/no/run"))), "cannot create")
    for out in (a_file / "data", Path("/proc/no/data")):
        fails_with(run_cli(["-m", "trainer.prepare", "--text", str(CORPUS), "--out",
                            str(out), "--tokenizer-file", str(BPE)]), "--out")
    assert a_file.read_text() == "kept" and sorted(tmp_path.iterdir()) == [a_file]


def test_truncated_latest_checkpoint_resumes_from_the_one_before(shakespeare_data, tmp_path):
    """The newest checkpoint cut short (a rank's shard file truncated): one line says so,
    the run resumes from the newest checkpoint that loads and continues bit for bit; when
    none loads, one error line and exit 2."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = ["--checkpoint.every=3", "--capture.enabled=false"]
    ok(run_cli(torchrun(2) + train_args(shakespeare_data, ref, *args, steps=8)[1:]))
    ok(run_cli(torchrun(2) + train_args(shakespeare_data, run, *args, steps=6)[1:]))
    shard = sorted((run / "checkpoints" / "step_00000006").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    r = ok(run_cli(torchrun(2) + train_args(shakespeare_data, run, *args, "--resume",
                                            steps=8)[1:]))
    assert "Traceback" not in r.stderr
    notes = [x for x in r.stderr.splitlines() if x.startswith(("warning:", "resuming"))]
    assert len(notes) == 2 and "step_00000006 cannot be loaded" in notes[0], r.stderr
    assert "resuming from step 3" in notes[1]
    assert losses(run) == losses(ref)  # steps 4-8 redone exactly as the uninterrupted run

    for step in checkpoint.list_complete(run):  # now every checkpoint is broken
        for f in (run / "checkpoints" / f"step_{step:08d}").glob("*.distcp"):
            f.write_bytes(b"")
    # (one process this time: torchrun adds its own report of a failed worker)
    r = run_cli(train_args(shakespeare_data, run, *args, "--resume", steps=10))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert all(x.startswith("warning: checkpoint") for x in lines[:-1]), r.stderr
    assert lines[-1].startswith("error: no checkpoint in") and "can be loaded" in lines[-1]


def test_synthetic_data_under_a_gpt2_tokenizer_config(tmp_path):
    """Synthetic token ids (no tokenizer, vocabulary 32) under a config made for GPT-2's
    tokenizer: refused before anything is written, naming the fix."""
    data = tmp_path / "synthetic"
    ok(run_cli(["-m", "trainer.synthetic", "--out", str(data), "--vocab", "32",
                "--tokens", "20000", "--val-tokens", "4096"]))
    fails_with(run_cli(train_args(data, tmp_path / "run")),
               "holds synthetic token ids below 32")
    fails_with(run_cli(train_args(data, tmp_path / "run", "--model.vocab_size=32",
                                  f"--data.tokenizer_file={BPE}")),
               "sets data.tokenizer_file")
    assert not (tmp_path / "run").exists()

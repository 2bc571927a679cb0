"""Shared test helpers: paths to the offline data, running the project's CLIs, and the tiny
training runs the integration tests start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))
CORPUS = SHARED / "data" / "tinyshakespeare.txt"
BPE = SHARED / "data" / "gpt2.tiktoken"


def env(**extra) -> dict:
    e = dict(os.environ)
    # CPU and gloo even where GPUs are visible: the tests run 2 ranks (more than a one-GPU
    # machine has) and assert bit-identical resumes, which CUDA's reductions do not give.
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def torchrun(nproc: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def losses(run_dir: Path) -> list[float]:
    m = read_metrics(run_dir)
    return [m[s]["loss"] for s in sorted(m)]


# ----------------------------------------------------------------------------- tiny runs

STEPS = 12
# 4 seqs x 32 tokens x 2 ranks = 256 tokens: 1 micro-batch per rank on 2 ranks, 2 on 1 rank.
TINY = [
    "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
    "--train.micro_batch_size=4", "--train.global_batch_tokens=256", "--optim.lr=1e-2",
    "--optim.warmup_steps=3", "--optim.decay_steps=12", "--eval.every=0", "--log.plot=false",
    "--checkpoint.every=3",
    "--checkpoint.keep_last=0",
]


def train_args(data: Path, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["-m", "trainer", "--data", str(data), "--run-dir", str(run_dir),
            "--max-steps", str(steps), *TINY, *extra]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def popen(args: list[str]) -> subprocess.Popen:
    """A run in its own process group (the tests signal or kill it while it runs)."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended early ({proc.returncode}):\n{out}\n{err}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def steps_logged(run_dir: Path) -> int:
    try:
        return max(read_metrics(run_dir), default=0)
    except (FileNotFoundError, ValueError):
        return 0


# The dashboard tests' run (tests/integration/conftest.py's tiny_run): 3 layers, with capture.
TINY_ARGS = ["--max-steps", "8", "--model.n_layer=3", "--model.n_head=2", "--model.n_embd=32",
             "--model.block_size=32", "--train.micro_batch_size=4",
             "--train.global_batch_tokens=128", "--eval.every=4", "--eval.val_batches=2",
             "--eval.sample_tokens=0", "--capture.every=2", "--capture.probe_seqs=4",
             "--capture.probe_len=16", "--capture.attn_len=8", "--capture.snapshot_every=3",
             "--log.plot=false"]
# What TINY_ARGS capture (capture/schedule.py): the tests check the store agrees first.
TINY_STEPS, TINY_FULL, TINY_SNAPSHOTS = [0, 1, 2, 4, 6, 8], [0, 1, 2, 4, 8], [0, 1, 2, 3, 6, 8]

"""Shared test helpers: paths to the offline data, running the project's CLIs, and the tiny
training runs the integration tests start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))
CORPUS = SHARED / "data" / "tinyshakespeare.txt"
BPE = SHARED / "data" / "gpt2.tiktoken"


# The environment of this thread's CLI runs when not os.environ: the runs started ahead
# (RunsAhead) keep the session's, whatever a test running meanwhile sets.
_thread = threading.local()


def env(**extra) -> dict:
    e = dict(getattr(_thread, "environ", None) or os.environ)
    # CPU and gloo even where GPUs are visible: the tests run 2 ranks (more than a one-GPU
    # machine has) and assert bit-identical resumes, which CUDA's reductions do not give.
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def side_by_side(fn, *items, parallel: int = 2) -> list:
    """fn(item) for each item, `parallel` at a time, results in the order given (the first
    error raised once all have ended). For independent CLI runs: a one-process run keeps
    one core of two busy, so two of them take about the time of one."""
    environ = getattr(_thread, "environ", None)

    def init() -> None:
        _thread.environ = environ

    with ThreadPoolExecutor(max_workers=parallel, initializer=init) as ex:
        futures = [ex.submit(fn, item) for item in items]
    return [f.result() for f in futures]


def run_clis(*runs: list[str], parallel: int = 2, timeout: float = 600
             ) -> list[subprocess.CompletedProcess]:
    """run_cli for each argument list, `parallel` at a time (side_by_side)."""
    return side_by_side(lambda args: run_cli(args, timeout=timeout), *runs, parallel=parallel)


# ----------------------------------------------------------------------------- runs ahead

# Trainings started ahead of the tests that read them. A job is a function fn(data, base) ->
# result registered (@ahead) under the name of the fixture that reads its result with
# runs_ahead.take(name); it only runs the processes, the fixture checks their exit status.
# `data`: tiny shakespeare tokenized (tests/conftest.py's shakespeare_data); `base`: a new
# temporary folder. tests/conftest.py's runs_ahead (RunsAhead) starts the jobs of the
# fixtures the collected tests use, one job at a time in a background thread from the
# session's first test on, in the order the tests need them: they train on the core that
# the tests before leave idle (the unit tests, which run first, and most integration tests
# use one process at a time).
AHEAD: dict[str, Callable[[Path, Path], Any]] = {}
AHEAD_WITHOUT_DATA: set[str] = set()  # jobs that do not read `data`


def ahead(fixture: str, data: bool = True):
    """Registers the decorated fn(data, base) as the job of `fixture` (AHEAD); data=False:
    the job does not read `data`."""
    def register(fn):
        assert fixture not in AHEAD, f"two jobs for {fixture}"
        AHEAD[fixture] = fn
        if not data:
            AHEAD_WITHOUT_DATA.add(fixture)
        return fn
    return register


class RunsAhead:
    """The AHEAD jobs of `names`, run one at a time in a background thread, in that order,
    with the environment of the moment they were queued. take(name) returns a job's result:
    at once if it has run, when it ends if it is running, and run here and now if it has not
    started (or was not queued); a job's error is raised there."""

    def __init__(self, data: Path | None, mktemp: Callable[[str], Path], names: list[str]):
        self.data, self.mktemp = data, mktemp
        environ = dict(os.environ)

        def init() -> None:
            _thread.environ = environ

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runs-ahead",
                                       initializer=init)
        self.queued: dict[str, tuple[Path, Future]] = {}
        self.done: dict[str, Any] = {}
        for name in names:
            base = mktemp(name)  # (here, in the main thread)
            self.queued[name] = (base, self.pool.submit(AHEAD[name], data, base))

    def take(self, name: str) -> Any:
        if name not in self.done:
            base, future = self.queued.pop(name, (None, None))
            if future is not None and not future.cancel():
                self.done[name] = future.result()  # started: its result, or its error
            else:
                self.done[name] = AHEAD[name](self.data, base or self.mktemp(name))
        return self.done[name]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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


# Captures of the 12-step references (tests/integration/conftest.py's uninterrupted runs):
# a 16-token probe, statistics, activations and snapshots every 3 steps.
CAP3 = ["--capture.every=3", "--capture.full_every=3", "--capture.snapshot_every=3",
        "--capture.probe_seqs=4", "--capture.probe_len=16", "--capture.attn_seqs=2"]


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


# The dashboard tests' run (tests/integration/conftest.py's tiny_run; test_plan.py checks the
# capture plan against it): 3 layers, with capture.
TINY_ARGS = ["--max-steps", "8", "--model.n_layer=3", "--model.n_head=2", "--model.n_embd=32",
             "--model.block_size=32", "--train.micro_batch_size=4",
             "--train.global_batch_tokens=128", "--eval.every=4", "--eval.val_batches=2",
             "--eval.sample_tokens=0", "--capture.every=2", "--capture.probe_seqs=4",
             "--capture.probe_len=16", "--capture.attn_len=8", "--capture.snapshot_every=3",
             "--log.plot=false"]
# What TINY_ARGS capture (capture/schedule.py): the tests check the store agrees first.
TINY_STEPS, TINY_FULL, TINY_SNAPSHOTS = [0, 1, 2, 4, 6, 8], [0, 1, 2, 4, 8], [0, 1, 2, 3, 6, 8]

"""The harness of benchmarks/gpu_check.py's checks: the context a check runs in (its
settings, its result file, the processes it starts, each in a process group of its own so
that a timeout takes torchrun and its ranks down together) and reading a run's metrics."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class CheckFailed(Exception):
    """A check's expectation not met: its message is the report's error line."""


# ----------------------------------------------------------------------------- subprocesses


def error_line(text: str) -> str:
    """The line of a log that says what went wrong: the trainer's one-line `error: ...`,
    else the last exception line of a traceback (torchrun ends its own report with lines
    of '='), else the last non-empty line that is not decoration."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for pattern in (r"^error:", r"^([\w.]+(Error|Exception|Interrupt|Exit))(:|$)"):
        hits = [x for x in lines if re.match(pattern, x)]
        if hits:
            return hits[-1][:400]
    words = [x for x in lines if re.search(r"\w", x)]
    return words[-1][:400] if words else ""


@dataclass
class Proc:
    label: str
    rc: int | None  # None: killed at its timeout
    seconds: float
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        if self.rc is None:  # where it had got to: its last line of output
            last = [x for x in self.out.splitlines() if x.strip()][-1:] or ["(no output)"]
            return f"{self.label}: timed out after {self.seconds:.0f} s; last output: " \
                   f"{last[0].strip()[:300]}"
        return f"{self.label}: exit {self.rc}: {error_line(self.err) or error_line(self.out)}"


_live: set[subprocess.Popen] = set()  # the runs a SIGTERM must take down with us


def _kill_group(p: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def on_term(signum, frame):
    for p in list(_live):
        _kill_group(p)
    raise SystemExit(128 + signum)


class Ctx:
    """What gpu_check.py hands a check (CTX.json), and the check's growing result."""

    def __init__(self, d: dict, result_path: Path, name: str):
        self.__dict__.update(d)  # mode, quick, work, data_tiny, data_gpt2, gpus, deadline
        self.cuda = self.mode == "cuda"
        self.work, self.name, self.result_path = Path(self.work), name, result_path
        self.result = {"status": "fail", "error": "", "figures": {}, "notes": []}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)

    # results
    def fig(self, **kw) -> None:
        for k, v in kw.items():
            if isinstance(v, float) and math.isfinite(v):
                v = float(f"{v:.5g}")  # 5 significant digits: enough, and readable
            self.result["figures"][k] = v
        self.save()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self.save()

    def save(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.result_path)

    # processes
    def env(self, **extra) -> dict:
        e = dict(os.environ)
        # Keep what PYTHONPATH already holds: on a machine without internet the carried
        # wheels are found through it.
        e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get(
            "PYTHONPATH", "").split(os.pathsep) if p])
        e.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                 TOKENIZERS_PARALLELISM="false")
        if not self.cuda:
            e.setdefault("OMP_NUM_THREADS", "1")  # a CPU run shares its cores
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def remaining(self) -> float:
        return self.deadline - time.time()

    def start(self, label: str, args: list[str], **env) -> tuple[subprocess.Popen, Path]:
        log = self.work / "logs" / f"{self.name}-{label}"
        out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
        # A session of its own: a timeout takes down torchrun and its ranks together.
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env(**env),
                             stdout=out, stderr=err, start_new_session=True)
        _live.add(p)
        out.close(), err.close()
        return p, log

    def finish(self, label: str, p: subprocess.Popen, log: Path, t0: float) -> Proc:
        try:
            rc = p.wait(max(1.0, self.remaining()))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc = None
        finally:
            _live.discard(p)
        return Proc(label, rc, time.time() - t0, Path(f"{log}.out").read_text(errors="replace"),
                    Path(f"{log}.err").read_text(errors="replace"))

    def run(self, label: str, args: list[str], **env) -> Proc:
        t0 = time.time()
        p, log = self.start(label, args, **env)
        return self.finish(label, p, log, t0)

    def run_pair(self, a: tuple, b: tuple) -> tuple[Proc, Proc]:
        """Two runs at once (label, args): independent runs, half the wall time."""
        t0 = time.time()
        (pa, la), (pb, lb) = self.start(*a), self.start(*b)
        ra = self.finish(a[0], pa, la, t0)
        return ra, self.finish(b[0], pb, lb, t0)

    def must(self, p: Proc) -> Proc:
        if not p.ok:
            self.result["log_tail"] = (p.err.strip().splitlines() or p.out.splitlines())[-15:]
            raise CheckFailed(p.why())
        return p

    # the trainer's command lines
    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def torchrun(self, n: int = 1) -> list[str]:
        return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]

    def tiny(self, run: str, steps: int, *extra: str, device: bool = True) -> list[str]:
        """The tiny config on the tiny data; on CPU with a small vocabulary, since the
        capture's per-token work over 50,257 logits is what costs there."""
        args = ["-m", "trainer", "--config", "configs/tiny.toml", "--data", self.data_tiny,
                "--run-dir", str(self.work / "runs" / run), "--max-steps", str(steps),
                "--log.plot=false", "--log.every=1"]
        if device:
            args.append(f"--parallel.device={self.device}")
        if not self.cuda:
            args.append(f"--model.vocab_size={self.tiny_vocab}")
        return args + list(extra)

    def gpt2(self, run: str, steps: int, *extra: str) -> list[str]:
        """GPT-2 124M, T=1024, micro-batch 16, bf16, one micro-batch a step; on CPU the
        same code at n_layer 2, width 64, T=64, micro-batch 8 and a small vocabulary."""
        if self.cuda:
            shape = ["--model.n_layer=12", "--model.n_head=12", "--model.n_embd=768",
                     "--model.block_size=1024", "--model.vocab_size=50257"]
            data, mb, t = self.data_gpt2, 16, 1024
        else:
            shape = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64",
                     "--model.block_size=64", f"--model.vocab_size={self.tiny_vocab}"]
            data, mb, t = self.data_tiny, 8, 64
        return ["-m", "trainer", "--config", "configs/gpt2.toml", "--data", data,
                "--run-dir", str(self.work / "runs" / run), "--max-steps", str(steps),
                *shape, f"--train.micro_batch_size={mb}", f"--train.global_batch_tokens={mb * t}",
                "--train.dtype=bf16", f"--parallel.device={self.device}",
                "--parallel.compile=false", "--eval.every=0", "--capture.enabled=false",
                "--log.plot=false", "--log.every=1", *extra]

    def steps(self, cuda: int, quick: int) -> int:
        return quick if self.quick else cuda


# ----------------------------------------------------------------------------- metrics


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            recs[r["step"]] = r
        except (ValueError, KeyError):
            pass
    return [recs[s] for s in sorted(recs)]


def median(xs: list) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def step_figures(recs: list[dict], skip: int = 2) -> dict:
    """Medians over the steady steps (after the first `skip`, none that compiled), the
    first step's time (with compile: the compile time) and the peak memory. mfu and mem_gb
    exist on CUDA only, mfu only for GPUs of known peak: absent keys give None."""
    steady = [r for r in recs if r["step"] > skip and not r.get("compile")] or \
        [r for r in recs if not r.get("compile")][-1:]
    mem = [r["mem_gb"] for r in recs if isinstance(r.get("mem_gb"), (int, float))]
    return {
        "steps": len(recs),
        "step_ms": median([r.get("step_ms") for r in steady]),
        "tokens_per_s": median([r.get("tokens_per_s") for r in steady]),
        "mfu": median([r.get("mfu") for r in steady]),
        "mem_gb": max(mem) if mem else None,
        "first_step_ms": recs[0].get("step_ms") if recs else None,
        "compile_steps": [r["step"] for r in recs if r.get("compile")],
        "final_loss": recs[-1].get("loss") if recs else None,
    }


def expect_steps(recs: list[dict], n: int, what: str) -> None:
    got = [r["step"] for r in recs]
    if got != list(range(1, n + 1)):
        raise CheckFailed(f"{what}: metrics.jsonl has steps {got}, expected 1..{n}")


# ----------------------------------------------------------------------------- checks

"""Peak memory and time of a capture at GPT-2 124M shapes on CPU, against training alone.

    python benchmarks/capture_memory.py [--max-steps 2] [--threads N] [--extra "ARGS"]
                                        [--shared DIR] [--keep DIR]

Why: at GPT-2 124M shapes a capture (probe forward with hooks, statistics, attention
patterns, training dynamics) must add at most 2 GB to peak memory over training alone.
This measures it, and what a capture costs in time against a training step.

What it runs (from the repository root, TMP a temporary folder):

    python -m trainer.prepare --text SHARED/data/tinyshakespeare.txt --out TMP/data \\
        --tokenizer-file SHARED/data/gpt2.tiktoken --val-fraction 0.05
    python -m trainer --config configs/gpt2.toml --data TMP/data --run-dir TMP/off \\
        --max-steps S --train.micro_batch_size=4 --train.global_batch_tokens=4096 \\
        --parallel.compile=false --train.dtype=fp32 --eval.every=0 --log.plot=false \\
        --capture.enabled=false EXTRA
    python -m trainer ...the same... --run-dir TMP/on EXTRA    (the default capture)

Each run is one CPU rank (no torchrun), a child process; OMP_NUM_THREADS is left as is
unless --threads is given. Peak memory is the child's peak RSS (ru_maxrss from os.wait4,
KiB on Linux; GB here is 10^9 bytes). Time: the baseline's median step_ms and each
capture's capture_ms (training's stall) from RUN/metrics.jsonl, and each run's wall time.
The step-0 capture (before the first step) is not in metrics.jsonl and so not in the
capture times, but it is in the peak RSS and the wall time. --extra (shlex-split) is
appended to both runs, e.g. --extra "--model.n_layer=2" to try it fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--config", "configs/gpt2.toml", "--train.micro_batch_size=4",
          "--train.global_batch_tokens=4096", "--parallel.compile=false", "--train.dtype=fp32",
          "--eval.every=0", "--log.plot=false"]


class Failed(Exception):
    pass


def run_child(cmd: list[str], logs: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run cmd from the repo root; returns (peak RSS in bytes, wall seconds)."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = err.read_text(errors="replace").splitlines()[-20:]
        errors = [x for x in tail if x.startswith("error:")]
        raise Failed(f"failed (exit {p.returncode}): {shlex.join(cmd)}\n"
                     + "\n".join(errors or tail))
    return usage.ru_maxrss * 1024.0, wall


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    p.add_argument("--extra", default="", help="arguments appended to both trainer commands")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--keep", type=Path, default=None, help="keep the temporary files here")
    a = p.parse_args()
    env = dict(os.environ)
    if a.threads is not None:
        env["OMP_NUM_THREADS"] = str(a.threads)
    extra = shlex.split(a.extra)
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="capture_memory-", dir=a.keep)).resolve()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="capture_memory-"))
    try:
        return bench(a, tmp, env, extra)
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if a.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept: {tmp}")


def bench(a, tmp: Path, env: dict[str, str], extra: list[str]) -> int:
    data_dir = (a.shared / "data").resolve()
    data = tmp / "data"
    print("preparing data ...", flush=True)
    run_child([sys.executable, "-m", "trainer.prepare", "--text",
               str(data_dir / "tinyshakespeare.txt"), "--out", str(data), "--tokenizer-file",
               str(data_dir / "gpt2.tiktoken"), "--val-fraction", "0.05"], tmp / "prepare", env)
    res: dict[str, dict] = {}
    for name, flags in (("baseline", ["--capture.enabled=false"]), ("with capture", [])):
        run = tmp / ("off" if flags else "on")
        cmd = [sys.executable, "-m", "trainer", *COMMON, "--data", str(data), "--run-dir",
               str(run), "--max-steps", str(a.max_steps), *flags, *extra]
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        rss, wall = run_child(cmd, tmp / run.name, env)
        recs = metrics(run)
        res[name] = {"rss": rss, "wall": wall, "recs": recs,
                     "step_ms": statistics.median(r["step_ms"] for r in recs),
                     "captures": [(r["step"], r["capture_ms"]) for r in recs
                                  if "capture_ms" in r]}
    base, cap = res["baseline"], res["with capture"]
    step_ms = base["step_ms"]
    print(f"\nthreads: {env.get('OMP_NUM_THREADS', 'unset')}, max steps {a.max_steps}, "
          f"extra: {shlex.join(extra) or '-'}")
    print(f"{'run':<14}{'peak RSS GB':>12}{'wall s':>9}{'steps':>7}{'median step ms':>16}"
          f"{'captures':>10}")
    for name, r in res.items():
        print(f"{name:<14}{r['rss'] / 1e9:>12.2f}{r['wall']:>9.1f}{len(r['recs']):>7}"
              f"{r['step_ms']:>16.1f}{len(r['captures']):>10}")
    print("\ncaptures in metrics.jsonl (the step-0 capture is not there):")
    for step, ms in cap["captures"]:
        print(f"  step {step:>6}: {ms:9.1f} ms = {ms / step_ms:.2f}x the baseline's median step")
    added = cap["rss"] - base["rss"]
    print(f"\npeak RSS: baseline {base['rss'] / 1e9:.2f} GB, with capture {cap['rss'] / 1e9:.2f} "
          f"GB, capture adds {added / 1e9:.2f} GB (ratio {cap['rss'] / base['rss']:.2f}x)")
    if cap["captures"]:
        c = statistics.median(ms for _, ms in cap["captures"])
        print(f"capture time: median {c:.0f} ms per capture vs step {step_ms:.0f} ms "
              f"(ratio {c / step_ms:.2f}x)")
    else:
        print(f"capture time: median n/a ms per capture vs step {step_ms:.0f} ms "
              "(ratio n/a; no capture_ms in metrics.jsonl)")
    print(f"wall: baseline {base['wall']:.1f} s, with capture {cap['wall']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

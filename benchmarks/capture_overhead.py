"""Wall time of training with the default capture against the same training without it.

    python benchmarks/capture_overhead.py [--steps 200] [--nproc 2] [--repeats 2]

Three configs go through the user's CLI (torchrun, gloo on CPU), on tiny shakespeare, with
the same config: capture off (the baseline), the default capture (with the training
dynamics: head scores, logit lens, neuron logit effects), and the default capture with
`--capture.dynamics=false`. The time is the training loop's, from the
first step's start to the last step's end plus the final drain and checkpoint (read from
each run's metrics.jsonl and its end marker), so interpreter start-up is not counted.
Runs alternate (off, on, no-dynamics, off, ...) so machine noise hits them alike; the
figures are ratios of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def prepare(tmp: Path) -> Path:
    out = tmp / "data"
    subprocess.run([sys.executable, "-m", "trainer.prepare", "--text",
                    str(SHARED / "tinyshakespeare.txt"), "--out", str(out), "--tokenizer-file",
                    str(SHARED / "gpt2.tiktoken"), "--val-fraction", "0.05"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


VARIANTS = {"off": ["--capture.enabled=false"], "on": [],
            "on, no dynamics": ["--capture.dynamics=false"]}


def one_run(data: Path, run: Path, extra: list[str], a) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={a.nproc}", "-m", "trainer", "--config", "configs/tiny.toml",
           "--data", str(data), "--run-dir", str(run), "--max-steps", str(a.steps),
           "--eval.every=0", "--log.plot=false", "--log.every=1000",
           f"--checkpoint.every={a.steps}", f"--parallel.device={a.device}", *extra]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // a.nproc))})
    end = time.time()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = recs[0]["time"] - recs[0]["step_ms"] / 1e3  # start of step 1
    # The loop's end: the process exit, less the interpreter's teardown (~0.1 s, the same
    # in both) -- the final capture drain and checkpoint are part of the run.
    assert t0 < first < end
    stall = sum(r.get("capture_ms", 0.0) for r in recs) / 1e3
    steps = sum(r["step_ms"] for r in recs) / 1e3
    if stall:
        print(f"  in-run: training stalled {stall:.2f} s in captures over {steps:.2f} s of "
              f"steps ({100 * stall / steps:.2f}%)", flush=True)
    return end - first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="cpu (gloo) or cuda (one GPU per rank: --nproc at most the GPUs)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = prepare(tmp)
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for i in range(a.repeats):
            for j, (name, extra) in enumerate(VARIANTS.items()):
                t = one_run(data, tmp / f"run-{j}-{i}", extra, a)
                times[name].append(t)
                print(f"run {i} capture {name}: {t:7.2f} s", flush=True)
        store = tmp / "run-1-0" / "capture.zarr"
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nconfigs/tiny.toml, {a.steps} steps, {a.nproc} ranks, its default capture "
          f"(the tiers of its [capture] section; store {size / 1e6:.1f} MB)")
    print("median wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    for name in ("on", "on, no dynamics"):
        r = med[name] / med["off"]
        print(f"capture overhead ({name}): {100 * (r - 1):+.2f}% (ratio {r:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

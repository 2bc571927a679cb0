"""Shared test helpers: paths to the offline data and running the project's CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

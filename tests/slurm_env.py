"""Shared by the SLURM test modules: a cluster of their own started by
slurm/local_cluster.sh, and sbatch / scontrol around slurm/fsdp_capture.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from capture.schedule import Schedule
from helpers import ROOT, env, read_metrics
from store.reader import RunStore
from trainer import checkpoint
from trainer.config import load_run_config

SCRIPT = ROOT / "slurm" / "fsdp_capture.sh"
TOOL = str(ROOT / "slurm" / "local_cluster.sh")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def cluster_tool(cmd: str, *args: str, timeout: float = 120, **settings
                 ) -> subprocess.CompletedProcess:
    """slurm/local_cluster.sh CMD ARGS with SLURM_LOCAL_* settings (keyword arguments)."""
    e = env(**{f"SLURM_LOCAL_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run([TOOL, cmd, *args], env=e, capture_output=True, text=True,
                          timeout=timeout)


def start_cluster(*args: str, **settings) -> dict:
    """A fresh cluster of its own: install (skipped when present), then start."""
    r = cluster_tool("install", timeout=600, **settings)
    assert r.returncode == 0, r.stderr
    # A cluster of this name that a killed earlier run left (its nodes, and the daemons in
    # them) would hold the name and the subnet: remove it first.
    r = cluster_tool("stop", **settings)
    assert r.returncode == 0, r.stderr
    r = cluster_tool("start", *args, **settings)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"SLURM_CONF": str(Path(settings["dir"]) / "slurm.conf"), "dir": settings["dir"],
            "settings": settings}


def job_env(cluster, **extra) -> dict:
    # The job inherits the submitting environment (sbatch --export=ALL): this venv first.
    return env(SLURM_CONF=cluster["SLURM_CONF"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra)


def sbatch(cluster, submit_dir: Path, name: str, opts: list[str], args: list[str],
           **extra_env) -> str:
    r = subprocess.run(["sbatch", "--parsable", "-J", name, *opts, str(SCRIPT), *args],
                       cwd=submit_dir, env=job_env(cluster, **extra_env), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job(cluster, jid: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", jid], env=job_env(cluster),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def wait_done(cluster, jid: str, timeout: float = 420) -> dict[str, str]:
    t0 = time.time()
    pending_since = t0
    while True:
        info = job(cluster, jid)
        if info["JobState"] in DONE:
            return info
        if info["JobState"] != "PENDING":
            pending_since = time.time()
        # A requeued job waits about 40 s; much longer means it can never start.
        assert time.time() - pending_since < 150, f"job {jid} pending: {info.get('Reason')}"
        assert time.time() - t0 < timeout, f"job {jid} still {info['JobState']}"
        time.sleep(1)


def wait_for_step(run_dir: Path, step: int, cluster, jid: str, timeout: float = 300) -> None:
    t0 = time.time()
    while not (run_dir / "metrics.jsonl").exists() or max(read_metrics(run_dir), default=0) < step:
        info = job(cluster, jid)
        assert info["JobState"] not in DONE, f"job ended early: {info['JobState']}"
        assert time.time() - t0 < timeout, "timed out waiting for the job to train"
        time.sleep(0.2)


def signal_batch(cluster, jid: str, sig: str = "USR2") -> None:
    """The signal to the job's batch shell only: what --signal=B:USR2@N does before a
    time limit."""
    subprocess.run(["scancel", "--batch", f"--signal={sig}", jid], env=job_env(cluster),
                   check=True, timeout=30)


def metric_steps(run_dir: Path) -> list[int]:
    """Every record's step, duplicates kept."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def expected_captures(run_dir: Path) -> list[int]:
    c = load_run_config(run_dir)
    return Schedule.of(c.capture, c.train.max_steps).steps("summary")


def check_whole_run(run_dir: Path, steps: int) -> None:
    """Every step logged once, every scheduled capture committed once, the final checkpoint."""
    assert metric_steps(run_dir) == list(range(1, steps + 1))
    got = RunStore(run_dir / "capture.zarr").steps().tolist()
    assert got == expected_captures(run_dir)
    assert checkpoint.latest_step(run_dir) == steps
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"

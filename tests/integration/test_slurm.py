"""`sbatch slurm/fsdp_capture.sh` on a real single-node SLURM cluster (Debian's slurmctld,
slurmd and munge, started by slurm/local_cluster.sh): a job runs to completion; a job
signalled before its time limit checkpoints, requeues itself and resumes bit for bit; a
bad argument fails fast with the message in the job's log. And the same script under
PBS's environment with a real mpiexec (MPICH's Hydra)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from capture.schedule import Schedule
from helpers import ROOT, TINY, env, losses, read_metrics
from store.reader import RunStore
from trainer import checkpoint
from trainer.config import load_run_config

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "slurm" / "fsdp_capture.sh"
STEPS = 18
# 2 ranks on CPU, on one node: the script starts one torchrun with 2 processes.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
           "--time=15"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def job_args(data: Path, run_dir: Path) -> list[str]:
    return ["--data", str(data), "--run-dir", str(run_dir), "--max-steps", str(STEPS), *TINY,
            "--checkpoint.every=6", "--capture.every=4", "--capture.probe_seqs=4",
            "--capture.probe_len=16", "--capture.attn_seqs=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh single-node cluster of its own (own state dir and ports), stopped at the end."""
    d = tmp_path_factory.mktemp("slurm")
    e = env(SLURM_LOCAL_DIR=d, SLURM_LOCAL_PORT=6917)
    tool = str(ROOT / "slurm" / "local_cluster.sh")
    r = subprocess.run([tool, "install"], env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([tool, "start"], env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield {"SLURM_CONF": str(d / "slurm.conf"), "dir": d}
    finally:
        subprocess.run([tool, "stop"], env=e, timeout=60)


def job_env(cluster, **extra) -> dict:
    # The job inherits the submitting environment (sbatch --export=ALL): this venv first.
    return env(SLURM_CONF=cluster["SLURM_CONF"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra)


def sbatch(cluster, submit_dir: Path, name: str, args: list[str], **extra_env) -> str:
    r = subprocess.run(["sbatch", "--parsable", "-J", name, *CPU_JOB, str(SCRIPT), *args],
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


def signal_at_step(cluster, run_dir: Path, jid: str, step: int) -> dict[str, str]:
    """Once the job has trained `step` steps, USR2 to its batch shell only (what
    --signal=B:USR2@N does before a time limit); returns the job's final record."""
    wait_for_step(run_dir, step, cluster, jid)
    subprocess.run(["scancel", "--batch", "--signal=USR2", jid], env=job_env(cluster),
                   check=True, timeout=30)
    return wait_done(cluster, jid)


def metric_steps(run_dir: Path) -> list[int]:
    """Every record's step, duplicates kept."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def expected_captures(run_dir: Path) -> list[int]:
    c = load_run_config(run_dir)
    return Schedule.of(c.capture, c.train.max_steps).steps("summary")


def check_whole_run(run_dir: Path) -> None:
    """Every step logged once, every scheduled capture committed once, the final checkpoint."""
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    steps = RunStore(run_dir / "capture.zarr").steps().tolist()
    assert steps == expected_captures(run_dir)
    assert checkpoint.latest_step(run_dir) == STEPS
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def completed(cluster, shakespeare_data, tmp_path_factory):
    """One uninterrupted job; the others are compared against it."""
    submit = tmp_path_factory.mktemp("submit")
    run_dir = submit / "run"
    jid = sbatch(cluster, submit, "whole", job_args(shakespeare_data, run_dir))
    return jid, wait_done(cluster, jid), submit, run_dir


def test_job_runs_to_completion(completed):
    jid, info, submit, run_dir = completed
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0")
    check_whole_run(run_dir)
    log = run_dir / "logs" / f"whole-{jid}.out"
    text = log.read_text()
    assert "2 rank(s)" in text and "restart 0 (SLURM_RESTART_COUNT" in text
    assert f"training finished at step {STEPS}" in text
    # SLURM's own output file, in the submit dir, points to the run dir's log.
    assert (submit / f"whole-{jid}.out").read_text() == f"log: {log}\n"
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["scheduler"], status["job_id"], status["restarts"]) == ("slurm", jid, 0)


def test_signalled_job_checkpoints_requeues_and_resumes(pbs_legs, cluster, completed,
                                                        shakespeare_data, tmp_path):
    """What a time limit does (--signal=B:USR2@300): USR2 to the batch shell only. (The PBS
    test's job starts first and runs beside this one: the cluster's node is idle while the
    requeued job waits.)"""
    run_dir = tmp_path / "run"
    jid = sbatch(cluster, tmp_path, "preempted", job_args(shakespeare_data, run_dir))
    info = signal_at_step(cluster, run_dir, jid, 5)
    log = (run_dir / "logs" / f"preempted-{jid}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    # One log, appended to by both runs of the job.
    stop = int(re.search(r"checkpoint saved at step (\d+); requeueing \(restart 1 of", log)[1])
    assert 5 <= stop < STEPS
    order = ["restart 0 (SLURM_RESTART_COUNT", "got SIGUSR2", "requeueing",
             "restart 1 (SLURM_RESTART_COUNT", f"resumed from step {stop}",
             f"training finished at step {STEPS}"]
    where = [log.index(s) for s in order]
    assert where == sorted(where), log
    assert (run_dir / "checkpoints" / f"step_{stop:08d}" / "meta.json").is_file()
    # A contiguous curve, no capture missing or twice, and the same numbers as the
    # uninterrupted job: the resume is exact.
    check_whole_run(run_dir)
    ref = completed[3]
    assert losses(run_dir) == losses(ref)
    a, b = RunStore(run_dir / "capture.zarr"), RunStore(ref / "capture.zarr")
    hook = next(iter(a.hooks))
    np.testing.assert_array_equal(a.stat(hook, "mean")[1], b.stat(hook, "mean")[1])


def test_requeues_are_capped(cluster, shakespeare_data, tmp_path):
    run_dir = tmp_path / "run"
    jid = sbatch(cluster, tmp_path, "capped", job_args(shakespeare_data, run_dir),
                 MAX_REQUEUES=0)
    info = signal_at_step(cluster, run_dir, jid, 2)
    log = (run_dir / "logs" / f"capped-{jid}.out").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "3:0", "0"), log
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["signal"]) == ("stopped", "SIGUSR2")
    assert checkpoint.latest_step(run_dir) == status["step"] < STEPS
    assert "not requeued: 0 requeues reached (MAX_REQUEUES). Resubmit with --resume" in log


def test_bad_argument_fails_fast_with_message_in_log(cluster, shakespeare_data, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    jid = sbatch(cluster, tmp_path, "typo",
                 [*job_args(shakespeare_data, run_dir), "--train.max_stepz=3"])
    info = wait_done(cluster, jid, timeout=120)
    took = time.time() - t0
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0")
    # Before the run dir is known, the log is SLURM's file in the submit dir.
    assert info["StdOut"] == str(tmp_path / f"typo-{jid}.out")
    text = Path(info["StdOut"]).read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "max_stepz" in errors[0], text
    assert "Traceback" not in text
    assert not run_dir.exists()  # nothing started, nothing written
    assert took < 60, f"took {took:.0f} s"  # no node was started: the check runs first


def test_bad_data_dir_fails_with_message_in_run_log(cluster, shakespeare_data, tmp_path):
    """A problem only the trainer can see (the data dir): the job fails, not requeued,
    with the trainer's one-line error in the run dir's log."""
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-data"
    args = job_args(shakespeare_data, run_dir)
    args[args.index("--data") + 1] = str(missing)
    jid = sbatch(cluster, tmp_path, "nodata", args)
    info = wait_done(cluster, jid, timeout=180)
    log = (run_dir / "logs" / f"nodata-{jid}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert info["ExitCode"] != "0:0"
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(missing) in errors[0], log
    assert "the trainer failed" in log
    assert checkpoint.latest_step(run_dir) is None


# -- PBS: the same script, launched by mpiexec ------------------------------------------

def pbs_env(tmp_path: Path, name: str) -> dict:
    nodefile = tmp_path / "nodefile"
    host = socket.gethostname().split(".")[0]
    nodefile.write_text(f"{host}\n{host}\n")  # PBS lists a node once per MPI process
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    e.update(PBS_JOBID="43.pbs-server", PBS_JOBNAME=name, PBS_O_WORKDIR=str(tmp_path),
             PBS_NODEFILE=str(nodefile), NPROC_PER_NODE="2",
             PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return e


def pbs_job(tmp_path: Path, name: str, args: list[str]) -> subprocess.Popen:
    assert shutil.which("mpiexec"), "mpiexec missing: make cluster-tools installs MPICH"
    return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=tmp_path,
                            env=pbs_env(tmp_path, name), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


class PbsLegs(threading.Thread):
    """The PBS job of test_pbs_mpiexec_launch_stops_on_term_and_resumes, run in a thread
    beside the SLURM tests (it needs no node of the cluster, which is idle while a requeued
    job waits): to step 4, PBS's SIGTERM to the batch shell, then the resubmitted job with
    --resume. Records what the test checks: each leg's exit status and output, and the
    status file and latest checkpoint the first leg left; `error` what failed on the way."""

    def __init__(self, data: Path, tmp_path: Path):
        super().__init__(daemon=True)
        self.tmp_path, self.run_dir = tmp_path, tmp_path / "run"
        self.args = job_args(data, self.run_dir)
        self.legs: list[tuple[int, str]] = []
        self.status1: dict = {}
        self.latest1: int | None = None
        self.error: BaseException | None = None
        self.procs: list[subprocess.Popen] = []

    def _leg(self, args: list[str]) -> subprocess.Popen:
        p = pbs_job(self.tmp_path, "pbsjob", args)
        self.procs.append(p)
        return p

    def run(self) -> None:
        try:
            run_dir = self.run_dir
            p = self._leg(self.args)
            t0 = time.time()
            while not (run_dir / "metrics.jsonl").exists() or \
                    max(read_metrics(run_dir), default=0) < 4:
                assert p.poll() is None, p.communicate()[0]
                assert time.time() - t0 < 300
                time.sleep(0.2)
            p.send_signal(signal.SIGTERM)  # to the batch shell
            out = p.communicate(timeout=300)[0]
            self.legs.append((p.returncode, out))
            self.status1 = json.loads((run_dir / "status.json").read_text())
            self.latest1 = checkpoint.latest_step(run_dir)
            p = self._leg([*self.args, "--resume"])
            out = p.communicate(timeout=300)[0]
            self.legs.append((p.returncode, out))
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error = e

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


@pytest.fixture(scope="module")
def pbs_legs(shakespeare_data, tmp_path_factory):
    assert shutil.which("mpiexec"), "mpiexec missing: make cluster-tools installs MPICH"
    legs = PbsLegs(shakespeare_data, tmp_path_factory.mktemp("pbs"))
    legs.start()
    try:
        yield legs
    finally:
        legs.join(timeout=660)
        legs.stop()


def test_pbs_mpiexec_launch_stops_on_term_and_resumes(pbs_legs, completed):
    """Under PBS (its job variables set, a real mpiexec), one process per rank with the
    MPI rank variables mapped to torch's; PBS's SIGTERM at the walltime stops the ranks at
    a checkpoint, and the resubmitted job (--resume) finishes with the same losses as the
    SLURM job. (The job ran beside the SLURM tests: PbsLegs.)"""
    pbs_legs.join(timeout=660)
    assert not pbs_legs.is_alive(), "the PBS job did not end"
    if pbs_legs.error is not None:
        raise pbs_legs.error
    run_dir = pbs_legs.run_dir
    (rc, out), (rc2, out2) = pbs_legs.legs
    assert rc == 3, out
    assert "pbs job 43 (pbsjob)" in out
    assert "got SIGTERM" in out and "resubmit with --resume" in out
    status = pbs_legs.status1
    assert (status["status"], status["scheduler"]) == ("stopped", "pbs")
    assert pbs_legs.latest1 == status["step"]

    out = out2
    assert rc2 == 0, out
    assert "1 node(s) x 2 rank(s)" in out and f"resumed from step {status['step']}" in out
    check_whole_run(run_dir)
    assert losses(run_dir) == losses(completed[3])
    log = (run_dir / "logs" / "pbsjob-43.out").read_text()  # both runs, appended
    assert log.count("pbs job 43 (pbsjob)") == 2 and "training finished" in log

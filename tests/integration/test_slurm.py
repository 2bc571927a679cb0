"""`sbatch slurm/fsdp_capture.sh` on a real single-node SLURM cluster (Debian's slurmctld,
slurmd and munge, started by slurm/local_cluster.sh): a job runs to completion; a job
signalled before its time limit checkpoints, requeues itself and resumes bit for bit; a
preempting SIGTERM that reaches torchrun leaves the ranks time for a slow checkpoint; a
bad argument fails fast with the message in the job's log. And the same script under
PBS's environment with a real mpiexec (MPICH's Hydra), resubmitting itself through qsub."""

from __future__ import annotations

import json
import os
import re
import shlex
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

import slurm_env
from helpers import ROOT, TINY, env, losses, read_metrics
from slurm_env import (SCRIPT, cluster_tool, job_env, signal_batch, start_cluster, wait_done,
                       wait_for_step)
from store.reader import RunStore
from trainer import checkpoint

pytestmark = pytest.mark.integration

ASSETS = ROOT / "tests" / "assets"
# On PYTHONPATH with SLOW_CHECKPOINT_S set: the checkpoint a stop signal asks for takes that
# long (tests/assets/slow_checkpoint/sitecustomize.py).
SLOW_CHECKPOINT = ASSETS / "slow_checkpoint"
SLOW_S = 40  # longer than the 30 s torchrun gives its ranks by default
STEPS = 18
# 2 ranks on CPU, on one node: the script starts one torchrun with 2 processes.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
           "--time=15"]


def job_args(data: Path, run_dir: Path) -> list[str]:
    return ["--data", str(data), "--run-dir", str(run_dir), "--max-steps", str(STEPS), *TINY,
            "--checkpoint.every=6", "--capture.every=4", "--capture.probe_seqs=4",
            "--capture.probe_len=16", "--capture.attn_seqs=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh single-node cluster of its own (own state dir and ports), stopped at the end."""
    settings = dict(dir=tmp_path_factory.mktemp("slurm"), port=6917)
    try:
        yield start_cluster(**settings)
    finally:
        cluster_tool("stop", **settings)


def sbatch(cluster, submit_dir: Path, name: str, args: list[str], **extra_env) -> str:
    """This module's job: 2 ranks on CPU on one node (one torchrun with 2 processes)."""
    return slurm_env.sbatch(cluster, submit_dir, name, CPU_JOB, args, **extra_env)


def signal_at_step(cluster, run_dir: Path, jid: str, step: int,
                   then=lambda: None) -> dict[str, str]:
    """Once the job has trained `step` steps, USR2 to its batch shell only (what
    --signal=B:USR2@N does before a time limit), then `then()`; returns the job's final
    record."""
    wait_for_step(run_dir, step, cluster, jid)
    signal_batch(cluster, jid)
    then()
    return wait_done(cluster, jid)


def check_whole_run(run_dir: Path) -> None:
    slurm_env.check_whole_run(run_dir, STEPS)


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


def test_signalled_job_checkpoints_requeues_and_resumes(pbs_legs, slow_term, cluster,
                                                        completed, shakespeare_data, tmp_path):
    """What a time limit does (--signal=B:USR2@300): USR2 to the batch shell only. (The PBS
    test's job starts first and runs beside this one, and the slow-checkpoint job is
    submitted as this one stops: the cluster's node is idle while the requeued job waits.)"""
    run_dir = tmp_path / "run"
    jid = sbatch(cluster, tmp_path, "preempted", job_args(shakespeare_data, run_dir))
    info = signal_at_step(cluster, run_dir, jid, 5, then=slow_term.begin)
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


class SlowTermJob(threading.Thread):
    """The job of test_preempting_term_leaves_time_for_a_slow_checkpoint, in a thread so it
    can start while the node would idle (a requeued job's wait): a job whose stop checkpoint
    takes SLOW_S seconds, SIGTERM to its step's processes (torchrun and the ranks) at step
    3, then the same job resubmitted with --resume. Records each job's id, final record
    and log, and what the first left behind; `error` what failed on the way."""

    def __init__(self, cluster, data: Path, tmp_path: Path):
        super().__init__(daemon=True)
        self.cluster, self.tmp_path, self.run_dir = cluster, tmp_path, tmp_path / "run"
        self.args = job_args(data, self.run_dir)
        self.jids: list[str] = []  # to cancel, should a test fail
        self.jobs: list[tuple[str, dict, str]] = []
        self.signalled_for: float = 0.0
        self.status1: dict = {}
        self.latest1: int | None = None
        self.ckpt_files: set[str] = set()
        self.error: BaseException | None = None

    def begin(self) -> None:
        if self.ident is None:  # not started yet
            self.start()

    def run(self) -> None:
        try:
            cluster, run_dir = self.cluster, self.run_dir
            jid = sbatch(cluster, self.tmp_path, "slowsave", self.args,
                         SLOW_CHECKPOINT_S=SLOW_S,
                         PYTHONPATH=f"{SLOW_CHECKPOINT}{os.pathsep}{ROOT}")
            self.jids.append(jid)
            wait_for_step(run_dir, 3, cluster, jid)
            t0 = time.time()
            # Without --batch/--full: every process of the job's steps (torchrun and the
            # ranks it started) gets it, the batch shell does not. That is SLURM's job-wide
            # signal (slurm_signal_job), as a preemption sends it to a job's steps. torchrun
            # acts on it by itself (passes it on, starts its kill timer) before the script
            # could step in: the case that lost slow checkpoints.
            subprocess.run(["scancel", "--signal=TERM", jid], env=job_env(cluster),
                           check=True, timeout=30)
            info = wait_done(cluster, jid)
            self.signalled_for = time.time() - t0
            self.jobs.append((jid, info, (run_dir / "logs" / f"slowsave-{jid}.out").read_text()))
            self.status1 = json.loads((run_dir / "status.json").read_text())
            self.latest1 = checkpoint.latest_step(run_dir)
            if self.latest1 is not None:
                self.ckpt_files = {p.name for p in
                                   checkpoint.step_dir(run_dir, self.latest1).iterdir()}
            jid = sbatch(cluster, self.tmp_path, "slowsave", [*self.args, "--resume"])
            self.jids.append(jid)
            info = wait_done(cluster, jid)
            self.jobs.append((jid, info, (run_dir / "logs" / f"slowsave-{jid}.out").read_text()))
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error = e


@pytest.fixture(scope="module")
def slow_term(cluster, shakespeare_data, tmp_path_factory):
    job = SlowTermJob(cluster, shakespeare_data, tmp_path_factory.mktemp("slowsave"))
    try:
        yield job
    finally:
        if job.ident is not None:
            job.join(timeout=600)
        for jid in job.jids:
            subprocess.run(["scancel", jid], env=job_env(cluster), timeout=30)


def test_preempting_term_leaves_time_for_a_slow_checkpoint(slow_term, completed):
    """A preemption's SIGTERM reaches torchrun and the ranks; the checkpoint they are asked
    for takes 40 s, longer than torchrun's own 30 s before it SIGKILLs its ranks. The ranks
    stop at a step boundary with a complete checkpoint and status "stopped", the job ends
    with status 3 (not requeued: that is the cluster's PreemptMode), and a resubmitted job
    with --resume finishes with the uninterrupted job's losses."""
    slow_term.begin()  # (started by the requeue test, unless that one was deselected)
    slow_term.join(timeout=900)
    assert not slow_term.is_alive(), "the slow-checkpoint jobs did not end"
    if slow_term.error is not None:
        raise slow_term.error
    (jid, info, log), (jid2, info2, log2) = slow_term.jobs
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "3:0", "0"), log
    # The slow save ran on both ranks, and the job waited for it.
    assert log.count(f"sleeping {SLOW_S} s before the stop's checkpoint") == 2, log
    assert slow_term.signalled_for >= SLOW_S
    status, stop = slow_term.status1, slow_term.status1["step"]
    assert (status["status"], status["signal"], status["job_id"]) == ("stopped", "SIGTERM", jid)
    assert 3 <= stop < STEPS and slow_term.latest1 == stop
    assert {"meta.json", "rng_rank0.pt", "rng_rank1.pt"} <= slow_term.ckpt_files
    assert "the ranks stopped at a checkpoint; the launcher exited 1" in log
    assert f"stopped at step {stop} on SIGTERM with a checkpoint; resubmit with --resume" in log

    assert (info2["JobState"], info2["ExitCode"]) == ("COMPLETED", "0:0"), log2
    assert f"resumed from step {stop}" in log2 and f"training finished at step {STEPS}" in log2
    check_whole_run(slow_term.run_dir)
    assert losses(slow_term.run_dir) == losses(completed[3])


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


def test_second_cluster_on_taken_ports_is_refused_with_one_line(cluster, tmp_path):
    """A cluster started on the ports of one that runs (say one a killed run left) would
    have the old slurmctld answer its sbatch: refused before anything is started."""
    other = tmp_path / "other"
    r = cluster_tool("start", dir=other, port=cluster["settings"]["port"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("local_cluster: port 6917 or 6918 is in use"), r.stderr
    assert not other.exists()
    assert "idle" in cluster_tool("status", **cluster["settings"]).stdout  # untouched


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

QSUB_STANDIN = ASSETS / "pbs"  # a qsub that records its arguments and runs the job
# The script's settings: none from this shell, so the jobs get exactly what the tests give.
SETTINGS = {"VENV", "PYTHON", "TORCHRUN", "NPROC_PER_NODE", "RDZV_PORT", "MPIEXEC",
            "MPIEXEC_ARGS", "QSUB_ARGS", "MAX_REQUEUES", "SAVE_TIMEOUT", "REQUEUE_COUNT",
            "FIRST_JOB_ID", "TRAIN_ARGS"}


def pbs_env(tmp_path: Path, name: str, job_id: int, **extra) -> dict:
    """The environment PBS gives job `job_id`, with the qsub stand-in first on PATH."""
    nodefile = tmp_path / "nodefile"
    host = socket.gethostname().split(".")[0]
    nodefile.write_text(f"{host}\n{host}\n")  # PBS lists a node once per MPI process
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_") and k not in SETTINGS}
    qsub_dir = tmp_path / "qsub"
    qsub_dir.mkdir(exist_ok=True)
    e.update(PBS_NODEFILE=str(nodefile), NPROC_PER_NODE="2",
             PATH=os.pathsep.join([str(QSUB_STANDIN), str(Path(sys.executable).parent),
                                   os.environ["PATH"]]),
             QSUB_STANDIN_DIR=str(qsub_dir), QSUB_STANDIN_ENV=str(tmp_path / "qsub.env"),
             QSUB_STANDIN_HOLD="1")
    # What a job the stand-in starts begins with: this, without the job's own variables.
    (tmp_path / "qsub.env").write_text("".join(
        f"export {k}={shlex.quote(v)}\n" for k, v in e.items()
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)))
    e.update(PBS_JOBID=f"{job_id}.pbs-server", PBS_JOBNAME=name, PBS_O_WORKDIR=str(tmp_path),
             **{k: str(v) for k, v in extra.items()})
    return e


class PbsLegs(threading.Thread):
    """The PBS jobs of test_pbs_job_stops_on_term_resubmits_itself_and_resumes, run in a
    thread beside the SLURM tests (they need no node of the cluster): job 43 to step 4,
    PBS's SIGTERM to its batch shell, the job it resubmits through qsub (44, started by the
    stand-in once 43 has ended) to the end; then a job with MAX_REQUEUES=0 (50), TERM at
    step 1. Records each job's exit status and output, what 43 left (status file, latest
    checkpoint) and what job 50 left; `error` what failed on the way."""

    def __init__(self, data: Path, tmp_path: Path):
        super().__init__(daemon=True)
        self.data, self.tmp_path = data, tmp_path
        self.run_dir, self.capped_dir = tmp_path / "run", tmp_path / "capped"
        self.qsub_dir = tmp_path / "qsub"
        self.legs: list[tuple[int, str]] = []
        self.status1: dict = {}
        self.latest1: int | None = None
        self.capped: tuple[int, str, dict, int | None] | None = None
        self.error: BaseException | None = None
        self.procs: list[subprocess.Popen] = []

    def _job(self, name: str, job_id: int, args: list[str], **extra) -> subprocess.Popen:
        assert shutil.which("mpiexec"), "mpiexec missing: make cluster-tools installs MPICH"
        p = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=self.tmp_path,
                             env=pbs_env(self.tmp_path, name, job_id, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def _term_at_step(p: subprocess.Popen, run_dir: Path, step: int) -> tuple[int, str]:
        t0 = time.time()
        while not (run_dir / "metrics.jsonl").exists() or \
                max(read_metrics(run_dir), default=0) < step:
            assert p.poll() is None, p.communicate()[0]
            assert time.time() - t0 < 300
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)  # to the batch shell, as PBS does at the walltime
        out = p.communicate(timeout=300)[0]
        return p.returncode, out

    def run(self) -> None:
        try:
            run_dir, qsub_dir = self.run_dir, self.qsub_dir
            p = self._job("pbsjob", 43, job_args(self.data, run_dir), MAX_REQUEUES=2)
            self.legs.append(self._term_at_step(p, run_dir, 4))
            self.status1 = json.loads((run_dir / "status.json").read_text())
            self.latest1 = checkpoint.latest_step(run_dir)
            (qsub_dir / "44.release").touch()  # job 43's nodes are free: 44 may start
            t0 = time.time()
            while not (qsub_dir / "44.rc").exists():
                assert (qsub_dir / "44.args").exists(), "job 43 did not call qsub"
                assert time.time() - t0 < 300, "the resubmitted job 44 did not end"
                time.sleep(0.5)
            self.legs.append((int((qsub_dir / "44.rc").read_text()),
                              (self.tmp_path / "pbsjob.o44").read_text()))

            p = self._job("capped", 50, job_args(self.data, self.capped_dir), MAX_REQUEUES=0)
            rc, out = self._term_at_step(p, self.capped_dir, 1)
            self.capped = (rc, out,
                           json.loads((self.capped_dir / "status.json").read_text()),
                           checkpoint.latest_step(self.capped_dir))
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error = e

    def stop(self) -> None:
        pids = [p.pid for p in self.procs if p.poll() is None]
        pids += [int(f.read_text()) for f in self.qsub_dir.glob("*.pid")
                 if not f.with_suffix(".rc").exists() and f.read_text().strip()]
        for pid in pids:  # each job a session (and process group) of its own
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.communicate()


@pytest.fixture(scope="module")
def pbs_legs(shakespeare_data, tmp_path_factory):
    assert shutil.which("mpiexec"), "mpiexec missing: make cluster-tools installs MPICH"
    legs = PbsLegs(shakespeare_data, tmp_path_factory.mktemp("pbs"))
    legs.start()
    try:
        yield legs
    finally:
        legs.join(timeout=900)
        legs.stop()


def test_pbs_job_stops_on_term_resubmits_itself_and_resumes(pbs_legs, completed):
    """Under PBS (its job variables set, a real mpiexec), one process per rank with the
    MPI rank variables mapped to torch's. PBS's SIGTERM at the walltime stops the ranks at
    a checkpoint, and the job resubmits itself with qsub (a stand-in that runs it as PBS
    would): the new job resumes, appends to the first job's log and finishes with the same
    losses as the SLURM job. With MAX_REQUEUES reached, a stopped job is not resubmitted
    and exits 3 saying so. (The jobs ran beside the SLURM tests: PbsLegs.)"""
    pbs_legs.join(timeout=900)
    assert not pbs_legs.is_alive(), "the PBS jobs did not end"
    if pbs_legs.error is not None:
        raise pbs_legs.error
    run_dir, qsub_dir = pbs_legs.run_dir, pbs_legs.qsub_dir
    (rc, out), (rc2, out2) = pbs_legs.legs
    status, stop = pbs_legs.status1, pbs_legs.status1["step"]
    assert rc == 0, out
    assert "pbs job 43 (pbsjob), resubmission 0 of job 43" in out and "got SIGTERM" in out
    assert (status["status"], status["scheduler"], status["signal"]) == \
        ("stopped", "pbs", "SIGTERM")
    assert 4 <= stop < STEPS and pbs_legs.latest1 == stop
    assert f"checkpoint saved at step {stop}; resubmitted as job 44.pbs-server " \
           "(resubmission 1 of at most 2)" in out
    # One qsub, as the job ran it: its settings travel in -v only (the stand-in's job
    # starts from a clean environment, as on a site that ignores #PBS -V).
    assert sorted(f.name for f in qsub_dir.glob("*.args")) == ["44.args"]
    assert (qsub_dir / "44.args").read_text().splitlines() == [
        "-N", "pbsjob", "-v", "TRAIN_ARGS,REQUEUE_COUNT,FIRST_JOB_ID,MAX_REQUEUES,SAVE_TIMEOUT,"
        "NPROC_PER_NODE", str(SCRIPT)]

    assert rc2 == 0, out2
    assert "pbs job 44 (pbsjob), resubmission 1 of job 43 (REQUEUE_COUNT; at most 2)" in out2
    assert "1 node(s) x 2 rank(s)" in out2 and f"resumed from step {stop}" in out2
    check_whole_run(run_dir)
    assert losses(run_dir) == losses(completed[3])
    # One log for the whole chain, under the first job's id.
    assert sorted(f.name for f in (run_dir / "logs").iterdir()) == ["pbsjob-43.out"]
    log = (run_dir / "logs" / "pbsjob-43.out").read_text()
    order = ["pbs job 43 (pbsjob)", "got SIGTERM", "resubmitted as job 44.pbs-server",
             "pbs job 44 (pbsjob)", f"resumed from step {stop}",
             f"training finished at step {STEPS}"]
    where = [log.find(s) for s in order]
    assert -1 not in where and where == sorted(where), log

    rc3, out3, status3, latest3 = pbs_legs.capped
    assert rc3 == 3, out3
    assert "not resubmitted: 0 resubmissions reached (MAX_REQUEUES). Resubmit with --resume" \
        in out3
    assert status3["status"] == "stopped" and latest3 == status3["step"] < STEPS
    assert sorted(f.name for f in qsub_dir.glob("*.args")) == ["44.args"]  # no qsub


@pytest.mark.parametrize("setting", ["SAVE_TIMEOUT=5m", "MAX_REQUEUES=-1"])
def test_bad_setting_fails_with_one_line(setting, tmp_path):
    """A setting bash arithmetic would misread is refused before anything starts."""
    name, value = setting.split("=")
    r = subprocess.run(["bash", str(SCRIPT), "--run-dir", str(tmp_path / "run")],
                       cwd=tmp_path, env=pbs_env(tmp_path, "bad", 60, **{name: value}),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if "error:" in line]
    assert errors == [errors[0]] and errors[0].endswith(
        f"error: {name} must be a whole number, not '{value}'"), r.stdout
    assert not (tmp_path / "run").exists()

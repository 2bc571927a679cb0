"""`sbatch --nodes=2 slurm/fsdp_capture.sh` on a real four-node SLURM cluster on this
machine (slurm/local_cluster.sh --nodes 4: each node a network namespace with its own
hostname and address on veth pairs, one slurmd per node, slurmctld on the first). Two
torchruns meet in a c10d rendezvous across the nodes, gloo on CPU, hybrid sharding with one
shard group per node; every rank of both nodes writes its part of each capture into one
store. A USR2 before the time limit checkpoints both nodes, requeues and resumes exactly; a
node whose job processes are killed (-9) fails the job cleanly, and a resubmission with
--resume finishes it exactly; a node that goes down altogether gets the job requeued by
SLURM, and it resumes exactly on the other nodes. And the cluster leaves nothing behind when
it stops, also after a start that failed half way."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import TINY, losses, read_metrics
from slurm_env import (DONE, check_whole_run, cluster_tool, expected_captures, job, sbatch,
                       signal_batch, start_cluster, wait_done)
from store.reader import RunStore
from trainer import checkpoint

pytestmark = pytest.mark.integration

STEPS = 12
NAME, SUBNET = "pytmn", "10.250.0"  # the namespaces' and links' prefix; the nodes' /24
# 2 nodes x 2 ranks, and 1 node x 2 ranks with the same global batch (512 tokens: 4 ranks
# x 4 sequences x 32 tokens in one round, or 2 ranks in two accumulation rounds).
CPU_JOB = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
# The cluster has 4 nodes. The jobs run on node0 and node1, but one: node0 and one of the
# spares, node2 or node3, which goes down; its requeued job runs on node0 and the other.
TWO_NODES = ["--nodes=2", "--nodelist=node[0-1]", *CPU_JOB]
ONE_NODE = ["--nodes=1", "--nodelist=node0", *CPU_JOB]
ON_A_SPARE = ["--nodes=2", "--nodelist=node0", "--exclude=node1", *CPU_JOB]


def job_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--run-dir", str(run_dir), "--max-steps", str(STEPS), *TINY,
            "--train.global_batch_tokens=512", "--checkpoint.every=3", "--capture.every=4",
            "--capture.probe_seqs=4", "--capture.probe_len=16", "--capture.attn_seqs=2",
            *extra]


def leftovers(name: str) -> list[str]:
    """What a cluster named `name` made and may have left: namespaces, links, hosts files."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found = re.findall(rf"\b{name}-node\d+\b", ns)
    found += re.findall(rf"\b{name}-(?:br|v\d+|p\d+)\b", links)
    found += [str(p) for p in Path("/etc/netns").glob(f"{name}-*")]
    return sorted(set(found))


def daemons(cluster_dir: Path) -> list[int]:
    """The live slurmctld/slurmd pids of the cluster in `cluster_dir`."""
    alive = []
    for f in cluster_dir.glob("*.pid"):
        try:
            pid = int(f.read_text())
            os.kill(pid, 0)
            alive.append(pid)
        except (ValueError, OSError):
            pass
    return alive


class AtStep(threading.Thread):
    """Once `run_dir` has logged `step`, calls `action()` (a signal, a kill): beside the
    other jobs of the module, which run at the same time."""

    def __init__(self, run_dir: Path, step: int, action):
        super().__init__(daemon=True)
        self.run_dir, self.step, self.action = run_dir, step, action
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            t0 = time.time()
            while not (self.run_dir / "metrics.jsonl").exists() or \
                    max(read_metrics(self.run_dir), default=0) < self.step:
                assert time.time() - t0 < 400, f"{self.run_dir} never reached step {self.step}"
                time.sleep(0.1)
            self.action()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error = e

    def check(self) -> None:
        self.join(timeout=600)
        assert not self.is_alive(), f"still waiting on {self.run_dir}"
        if self.error is not None:
            raise self.error


def node_pids(node: int) -> list[str]:
    """Every process that runs in node `node` (its network namespace)."""
    return subprocess.run(["ip", "netns", "pids", f"{NAME}-node{node}"], capture_output=True,
                          text=True, check=True).stdout.split()


def kill_job_on_node(jid: str, node: int) -> list[str]:
    """kill -9 every process job `jid` runs in node `node` (torchrun and its ranks): the
    node is gone as far as the job can tell. slurmd and the job's slurmstepd stay, so SLURM
    sees the tasks die; returns the killed processes' names."""
    killed = []
    for pid in node_pids(node):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if f"SLURM_JOB_ID={jid}".encode() in environ and comm != "slurmstepd":
            os.kill(int(pid), signal.SIGKILL)
            killed.append(comm)
    assert killed, f"no process of job {jid} in node{node}"
    return killed


def kill_node(node: int) -> None:
    """kill -9 everything that runs in node `node`, slurmd included: the node is down."""
    pids = node_pids(node)
    assert pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    """A four-node cluster of its own; each node offers 16 CPUs (the machine's two,
    shared), so the module's jobs run at the same time. A node that does not answer for
    15 s is DOWN (SLURM's default is 300 s)."""
    d = tmp_path_factory.mktemp("slurm2")
    settings = dict(dir=d, name=NAME, subnet=SUBNET, cpus=16, slurmd_timeout=15)
    try:
        yield start_cluster("--nodes", "4", **settings)
    finally:
        cluster_tool("stop", **settings)


@pytest.fixture(scope="module")
def jobs(cluster2, shakespeare_data, tmp_path_factory):
    """The module's jobs, submitted together: an uninterrupted 2-node job (the reference),
    a 1-node job of the same global batch, a 2-node job USR2-signalled at step 5, a 2-node
    job whose second node's processes are killed at step 5, and a 2-node job whose second
    node (a spare) goes down at step 5."""
    root = tmp_path_factory.mktemp("jobs")
    hybrid = "--parallel.sharding=hybrid"
    opts = {"ref": TWO_NODES, "one": ONE_NODE, "usr2": TWO_NODES, "lost": TWO_NODES,
            "down": ON_A_SPARE}
    runs = {name: root / name for name in opts}
    args = {k: job_args(shakespeare_data, runs[k], *([] if k == "one" else [hybrid]))
            for k in runs}
    jids = {k: sbatch(cluster2, root, k, opts[k], args[k]) for k in runs}
    resubmitted: dict[str, tuple[str, dict]] = {}
    lost: dict[str, str] = {}

    def lose_node_then_resubmit() -> None:
        """node1's part of the job killed; once the job has failed (as it should: checked
        by the test), the resubmission with --resume (the test checks how that went)."""
        kill_job_on_node(jids["lost"], 1)
        first = wait_done(cluster2, jids["lost"])
        run_dir = runs["lost"]
        left = {"latest": checkpoint.latest_step(run_dir),
                "status": json.loads((run_dir / "status.json").read_text())["status"],
                "committed": RunStore(run_dir / "capture.zarr").steps().tolist(),
                "expected": expected_captures(run_dir)}
        jid = sbatch(cluster2, root, "lost", TWO_NODES, [*args["lost"], "--resume"])
        resubmitted["lost"] = (jid, first, left)

    def take_a_node_down() -> None:
        """The job's spare node down (everything in it killed, slurmd too); then wait for
        SLURM to requeue the job (NODE_FAIL), which runs again on node0 and the other
        spare. (Not the same node brought back: SLURM's kill of the failed run, retried
        until the node answers, would hit the rerun there.)"""
        nodes = job(cluster2, jids["down"])["NodeList"]
        spare = {"node[0,2]": 2, "node[0,3]": 3}[nodes]
        lost["down"] = f"node{spare}"
        kill_node(spare)
        t0 = time.time()
        while (info := job(cluster2, jids["down"]))["Restarts"] == "0":
            assert info["JobState"] not in DONE, f"not requeued: {info['JobState']}"
            assert time.time() - t0 < 180, f"not requeued: {info['JobState']}"
            time.sleep(1)

    # Each acts at step 5 of its job, in a thread, while the other jobs run: the tests
    # then only check.
    watchers = {
        "usr2": AtStep(runs["usr2"], 5, lambda: signal_batch(cluster2, jids["usr2"])),
        "lost": AtStep(runs["lost"], 5, lose_node_then_resubmit),
        "down": AtStep(runs["down"], 5, take_a_node_down),
    }
    return {"root": root, "runs": runs, "jids": jids, "watchers": watchers, "args": args,
            "resubmitted": resubmitted, "lost": lost}


def finished(cluster2, jobs, name: str) -> tuple[dict, Path, str]:
    jid = jobs["jids"][name]
    info = wait_done(cluster2, jid)
    run_dir = jobs["runs"][name]
    log = (run_dir / "logs" / f"{name}-{jid}.out").read_text()
    return info, run_dir, log


def done_flags(run_dir: Path) -> np.ndarray:
    """captures/done: [slot, rank] = 1 once that rank's part of the capture is written."""
    return np.asarray(zarr.open_group(str(run_dir / "capture.zarr"), mode="r")["captures/done"][:])


def test_cluster_starts_and_stops_cleanly_also_after_a_failed_start(tmp_path):
    settings = dict(dir=tmp_path / "c", name="pytss", subnet="10.250.1", port=6827)
    try:
        r = cluster_tool("start", "--nodes", "2", **settings)
        assert r.returncode == 0, r.stdout + r.stderr
        status = cluster_tool("status", **settings).stdout
        assert "namespaces: pytss-node0 pytss-node1" in status and "idle" in status, status
        assert len(daemons(tmp_path / "c")) == 3  # slurmctld, 2 slurmd
        # A node's slurmd dies; `start` on the running cluster brings it back.
        pid = int((tmp_path / "c" / "slurmd-node1.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        while Path(f"/proc/{pid}").exists() and time.time() - t0 < 10:  # until reaped
            time.sleep(0.1)
        r = cluster_tool("start", **settings)
        assert r.returncode == 0, r.stdout + r.stderr
        status = cluster_tool("status", **settings).stdout
        assert "slurmd node1: running" in status and str(pid) not in status, status
        assert len(daemons(tmp_path / "c")) == 3
    finally:
        r = cluster_tool("stop", **settings)
    assert r.returncode == 0, r.stderr
    assert leftovers("pytss") == [] and daemons(tmp_path / "c") == []

    # A start that fails half way (node1's link name is taken) removes what it made, and
    # nothing it did not make.
    subprocess.run(["ip", "link", "add", "pytss-v1", "type", "bridge"], check=True)
    try:
        r = cluster_tool("start", "--nodes", "2", **settings)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines()[-1].startswith("local_cluster: cannot create")
        assert leftovers("pytss") == ["pytss-v1"] and daemons(tmp_path / "c") == []
    finally:
        subprocess.run(["ip", "link", "del", "pytss-v1"], check=True)

    # A cluster whose starter was killed, its state dir unknown: `stop` with only the name
    # removes its nodes, and the daemons in them (what a killed test run leaves behind).
    r = cluster_tool("start", "--nodes", "2", **settings)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(daemons(tmp_path / "c")) == 3
    r = cluster_tool("stop", **{**settings, "dir": tmp_path / "elsewhere"})
    assert r.returncode == 0, r.stderr
    assert leftovers("pytss") == [] and daemons(tmp_path / "c") == []


@pytest.mark.parametrize("args,settings,says", [
    (["--nodes", "two"], {}, "--nodes must be a positive number, got 'two'"),
    (["--nodes", "2"], {"name": "much-too-long"}, "SLURM_LOCAL_NAME 'much-too-long' is longer"),
    (["--nodes", "2"], {"subnet": "10.250"}, "SLURM_LOCAL_SUBNET must be three octets"),
    (["--nodez", "2"], {}, "unknown option '--nodez'"),
])
def test_bad_cluster_settings_are_one_line(tmp_path, args, settings, says):
    """Refused before anything is made: one line, exit 1, no namespace or link."""
    r = cluster_tool("start", *args, dir=tmp_path / "c", **settings)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("local_cluster: ") and says in r.stderr, r.stderr
    assert leftovers(settings.get("name", "slocal")) == [] and not (tmp_path / "c").exists()


def test_two_node_job_with_capture_completes(cluster2, jobs):
    info, run_dir, log = finished(cluster2, jobs, "ref")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    check_whole_run(run_dir, STEPS)
    assert "2 node(s) x 2 rank(s)" in log and "world 4 on cpu" in log
    # Hybrid sharding: one shard group per node (the ranks' hosts, from every rank).
    hosts = json.loads((run_dir / "status.json").read_text())["hosts"]
    assert sorted(hosts) == ["node0", "node0", "node1", "node1"] and hosts[0] == hosts[1]
    assert (f"sharding hybrid (2 shard group(s) of 2: ranks 0-1 on {hosts[0]}, ranks 2-3 on "
            f"{hosts[2]})") in log
    # Every rank of both nodes marked its part of every committed capture written.
    store = RunStore(run_dir / "capture.zarr")
    flags = done_flags(run_dir)[: len(store.steps())]
    assert flags.shape[1] == 4 and (flags == 1).all()


def test_hybrid_two_nodes_matches_one_node(cluster2, jobs):
    """The same global batch on 1 node x 2 ranks (full sharding, two accumulation rounds)
    gives the same run up to float rounding: the reductions' order differs."""
    info, one, log = finished(cluster2, jobs, "one")
    assert info["JobState"] == "COMPLETED", log
    assert "1 node(s) x 2 rank(s)" in log and "2 accumulation steps" in log
    _, ref, _ = finished(cluster2, jobs, "ref")
    check_whole_run(one, STEPS)
    np.testing.assert_allclose(losses(one), losses(ref), rtol=1e-6)
    a, b = RunStore(one / "capture.zarr"), RunStore(ref / "capture.zarr")
    assert a.steps().tolist() == b.steps().tolist()
    hook = next(iter(a.hooks))
    # The probe's activations, each sequence written by another rank (on either node).
    np.testing.assert_allclose(a.stat(hook, "mean")[1], b.stat(hook, "mean")[1], atol=1e-4)


def test_two_node_usr2_requeue_resumes_exactly(cluster2, jobs):
    jobs["watchers"]["usr2"].check()
    info, run_dir, log = finished(cluster2, jobs, "usr2")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stop = int(re.search(r"checkpoint saved at step (\d+); requeueing \(restart 1 of", log)[1])
    assert 5 <= stop < STEPS
    order = ["restart 0 (SLURM_RESTART_COUNT", "2 node(s) x 2 rank(s)", "got SIGUSR2",
             "requeueing", "restart 1 (SLURM_RESTART_COUNT", f"resumed from step {stop}",
             f"training finished at step {STEPS}"]
    where = [log.index(s) for s in order]
    assert where == sorted(where), log
    # Both nodes' ranks saved their shards of the stop checkpoint.
    assert (run_dir / "checkpoints" / f"step_{stop:08d}" / "meta.json").is_file()
    check_whole_run(run_dir, STEPS)
    _, ref, _ = finished(cluster2, jobs, "ref")
    assert losses(run_dir) == losses(ref)
    a, b = RunStore(run_dir / "capture.zarr"), RunStore(ref / "capture.zarr")
    hook = next(iter(a.hooks))
    np.testing.assert_array_equal(a.stat(hook, "mean")[1], b.stat(hook, "mean")[1])


def test_lost_node_fails_the_job_cleanly_and_a_resubmission_resumes(cluster2, jobs):
    """Documented (README, fsdp_capture.sh): the job fails, is not requeued (the script
    cannot tell a lost node from a bug), and resubmitting with --resume continues from the
    last complete checkpoint into the same store."""
    jobs["watchers"]["lost"].check()
    jid, info, left = jobs["resubmitted"]["lost"]
    run_dir = jobs["runs"]["lost"]
    log = (run_dir / "logs" / f"lost-{jobs['jids']['lost']}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert info["ExitCode"] != "0:0"
    assert "the trainer failed" in log
    # The surviving ranks say what happened in one line each, and what to do.
    lost = [line for line in log.splitlines() if "lost contact with another rank" in line]
    assert lost and all(line.startswith("error: rank ") and "resubmit with --resume" in line
                        for line in lost), log
    # What the failed job left, seen before the resubmission: the last complete checkpoint
    # (the one the ranks named), and only whole captures of the schedule.
    stopped = re.search(r"The last complete checkpoint is step (\d+)", log)
    latest = left["latest"]
    assert stopped and int(stopped[1]) == latest and 3 <= latest < STEPS, log
    assert left["status"] in ("failed", "running"), left
    committed = left["committed"]
    assert committed == [s for s in left["expected"] if s in committed] and committed

    info = wait_done(cluster2, jid)
    log = (run_dir / "logs" / f"lost-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert f"resumed from step {latest}" in log
    committed = RunStore(run_dir / "capture.zarr").steps().tolist()
    assert (done_flags(run_dir)[: len(committed)] == 1).all()
    check_whole_run(run_dir, STEPS)
    _, ref, _ = finished(cluster2, jobs, "ref")
    assert losses(run_dir) == losses(ref)


def test_node_down_requeues_and_resumes_on_the_other_nodes(cluster2, jobs):
    """Documented (README): a node that goes down altogether (slurmd too) is marked DOWN
    after SlurmdTimeout; SLURM requeues the job (NODE_FAIL, --requeue), which starts again
    on healthy nodes and resumes from the last complete checkpoint, with the same losses."""
    jobs["watchers"]["down"].check()
    info, run_dir, log = finished(cluster2, jobs, "down")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "DUE TO NODE FAILURE" in log and "restart 1 (SLURM_RESTART_COUNT" in log
    assert re.search(r"resumed from step [1-9]", log), log
    dead = jobs["lost"]["down"]
    hosts = json.loads((run_dir / "status.json").read_text())["hosts"]
    assert dead not in hosts and sorted(set(hosts)) == sorted({"node0", "node2", "node3"} - {dead})
    check_whole_run(run_dir, STEPS)
    _, ref, _ = finished(cluster2, jobs, "ref")
    assert losses(run_dir) == losses(ref)


def test_cluster_stop_leaves_nothing_behind(cluster2, jobs):
    """After the module's jobs: stopping removes the namespaces, links and hosts files, and
    every daemon and job process is gone. (Last in the module.)"""
    r = cluster_tool("stop", **cluster2["settings"])
    assert r.returncode == 0, r.stderr
    assert leftovers(NAME) == [] and daemons(Path(cluster2["dir"])) == []

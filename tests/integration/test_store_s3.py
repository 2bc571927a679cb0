"""The capture store on an S3 object store: a local S3 server (moto_server) on 127.0.0.1,
reached through s3fs with the endpoint taken from the environment (AWS_ENDPOINT_URL_S3).
A store written to s3://BUCKET/... reads back equal; a reader polling a live writer sees
only complete captures; a writer killed (-9) mid-capture leaves nothing torn visible. Object
stores have no rename: a chunk is one whole-object PUT, and the commit is the PUT of the
`captures/step` chunk, so these hold without one.

Then the same end to end with the real commands: the trainer writing to
`--capture.store=s3://...`, killed -9 mid-capture and resumed, while a reader and the
dashboard (AppTest, `?store=s3://...`) follow it; `python -m capture.export --store s3://...`
reading it back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

UNIT = Path(__file__).resolve().parents[1] / "unit"
if str(UNIT) not in sys.path:
    sys.path.insert(0, str(UNIT))

import store_util as u  # noqa: E402
from store.errors import StoreError  # noqa: E402
from store.reader import RunStore  # noqa: E402
from store.schema import FULL, SUMMARY  # noqa: E402
from store.writer import StoreWriter  # noqa: E402

pytestmark = pytest.mark.integration
pytest.importorskip("s3fs")

BUCKET = "captures"
HOST = "127.0.0.1"  # loopback only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/")
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, a bucket on it, and the environment s3fs
    (botocore) reads: credentials and AWS_ENDPOINT_URL_S3. Subprocesses inherit it."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or \
        shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server is not installed: pip install -e '.[test]' (make test does)")
    port = _free_port()
    server = subprocess.Popen([exe, "-H", HOST, "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not _answers(port):
            if server.poll() is not None or time.monotonic() - t0 > 30:
                pytest.fail(f"moto_server did not start on {HOST}:{port}")
            time.sleep(0.05)
        endpoint = f"http://{HOST}:{port}"
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
                         "NO_PROXY": HOST, "no_proxy": HOST}.items():
                mp.setenv(k, v)
            for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
                mp.delenv(k, raising=False)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            assert fs.exists(BUCKET)
            yield endpoint
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.kill()
        server.wait(timeout=10)


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}/capture.zarr"


def test_store_written_to_s3_reads_back_equal(s3):
    url = _url("roundtrip")
    w0 = StoreWriter.create_or_open(url, u.layout())
    w1 = StoreWriter.open(url)
    caps = [(0, 1, True), (1, 4, False)]
    for slot, step, full in caps:
        u.append([w0, w1], slot, step, full=full)
    w0.write_metrics("train", np.arange(1, 8),
                     {"loss": np.array([u.loss(s) for s in range(1, 8)], np.float32)})
    w0.set_status("finished")

    rs = RunStore(url)
    assert rs.status == "finished"
    assert rs.steps().tolist() == [1, 4]
    assert rs.steps("full").tolist() == [1]
    for _, step, full in caps:
        u.check_capture(rs, step, full)
    m = rs.metrics("train")
    assert np.array_equal(m["loss"], [u.loss(s) for s in m["step"]])

    # the storage_options form: the endpoint given explicitly, not from the environment
    rs2 = RunStore(url, storage_options={"client_kwargs": {"endpoint_url": s3}})
    assert rs2.steps().tolist() == [1, 4]
    # no rename: the store holds only the objects zarr and the writer name, no leftovers
    import s3fs

    keys = s3fs.S3FileSystem(skip_instance_cache=True).find(f"{BUCKET}/roundtrip")
    assert keys and not [k for k in keys if k.endswith(".partial")]


def test_reader_polling_a_live_writer_on_s3_sees_only_complete_captures(s3, tmp_path):
    url, flag = _url("live"), str(tmp_path / "reader-open")
    steps = [3 * i + 1 for i in range(6)]
    caps = [[slot, step, slot % 3 != 1] for slot, step in enumerate(steps)]
    reader = u.run_py(u.LIVE_READER.format(url=url, caps=caps, flag=flag, newest=1,
                                          verify_all=False, pause=0.05), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    writer = u.run_py(u.LIVE_WRITER.format(url=url, caps=caps, max_steps=40, flag=flag),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Bounds for a hang only (a loaded 2-core machine runs the S3 server too).
        _, w_err = writer.communicate(timeout=300)
        assert writer.returncode == 0, w_err
        r_out, r_err = reader.communicate(timeout=300)
        assert reader.returncode == 0, r_err
    finally:
        for p in (writer, reader):
            if p.poll() is None:
                p.kill()
                p.wait()
    res = json.loads(r_out.strip().splitlines()[-1])
    assert res["errors"] == [], "\n".join(res["errors"])
    # every capture read in full while the writer went on was complete (check_capture); a
    # full read costs seconds on S3, so only the newest capture of a poll is read in full
    assert res["final"] == steps and steps[-1] in res["verified"]
    assert set(res["verified"]) <= set(steps) and len(res["verified"]) >= 2, res
    # it really read mid-run, at several different numbers of committed captures
    assert res["polls"] > 4 and res["distinct"] >= 3, res


KILLED = """
import store_util as u
from store.writer import StoreWriter
url = {url!r}
w0 = StoreWriter.create_or_open(url, u.layout())
w1 = StoreWriter.open(url)
u.append([w0, w1], 0, 0)
w0.reserve(1)
u.write_part(w1, 1, 5, 1, 2)        # rank 1's part of step 5 is done, rank 0's never will be
first = True
while True:                          # rank 0 writing step 5's chunks when the kill comes
    u.write_part(w0, 1, 5, 0, 2, done=False)
    if first:
        print("writing", flush=True)
        first = False
"""


def test_writer_killed_mid_capture_on_s3_leaves_it_invisible(s3):
    url = _url("killed")
    p = u.run_py(KILLED.format(url=url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "writing", p.stderr.read()
        time.sleep(0.2)  # well inside rank 0's chunk writes
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL

    rs = RunStore(url)
    assert rs.steps().tolist() == [0]
    np.testing.assert_array_equal(rs.tokens(0), u.tokens(0, range(u.P)))
    np.testing.assert_array_equal(rs.activations("blocks.0.hook_resid_post", 0),
                                  u.acts(0, "blocks.0.hook_resid_post", range(u.P)))
    with pytest.raises(StoreError, match="step 5 is not captured"):
        rs.activations("blocks.0.hook_resid_post", 5)

    # resume from the checkpoint at step 0: slot 1 is redone from scratch
    w0 = StoreWriter.create_or_open(url, u.layout())
    assert w0.rollback_after(0) == []
    w1 = StoreWriter.open(url)
    for rank, w in enumerate((w0, w1)):
        u.write_part(w, 1, 5, rank, 2)
    w0.commit(1, 5, SUMMARY | FULL)
    assert rs.steps().tolist() == [0, 5]
    u.check_capture(rs, 5)


# ----------------------------------------------------------------------------- the trainer

# One real training run writing its captures to s3://, killed (-9, its whole process group)
# while a capture is being written after its first checkpoint, then resumed to the end, with
# a reader and the dashboard following it; the tests below share it. Every object is one
# request to a Python S3 server on a busy machine (creating the store alone costs ~15
# requests per array): the capture is trimmed to few arrays (no training dynamics, the
# residual stream only), with enough probe sequences (one chunk each per hook, and per input
# row) that writing a capture takes a while, for the kill to land inside one. A checkpoint
# every step: the trainer commits every capture before a checkpoint, so the capture killed
# is after the latest one and the resume must redo it.
RUN_STEPS = 4
P = 32
HOOK = "blocks.1.hook_resid_post"
CAPTURE = ["--capture.every=2", "--capture.full_every=2", "--capture.snapshot_every=4",
           "--capture.log_early=false", f"--capture.probe_seqs={P}", "--capture.probe_len=32",
           "--capture.attn_seqs=2", "--capture.hooks=blocks.*.hook_resid_post",
           "--capture.summary_hooks=blocks.*.hook_resid_post", "--capture.dynamics=false",
           "--checkpoint.every=1"]
SCHEDULE = dict(every=2, full_every=2, snapshot_every=4, max_steps=RUN_STEPS, log_early=False)


def _key(url: str, path: str) -> str:
    return f"{url[len('s3://'):]}/{path}"


def _written_slots(fs, url: str) -> set[int]:
    """Slots with some of their input chunks stored (inputs/tokens/c.SLOT.SEQ.0: the first
    thing a capture writes), committed or not, from a fresh listing."""
    prefix = _key(url, "inputs/tokens")
    fs.invalidate_cache(prefix)
    try:
        keys = fs.ls(prefix, detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    names = [k.rsplit("/", 1)[1] for k in keys]
    return {int(n.split(".")[1]) for n in names if n.startswith("c.")}


class Watcher:
    """A reader polling the live store as the dashboard does: one RunStore, its steps()
    re-read at every poll. Every capture it sees committed must be whole (check()): HOOK's
    activations of every probe sequence written (their fill is NaN), the inputs the probe
    set, every statistic finite."""

    def __init__(self, url: str):
        self.url, self.rs = url, None
        self.seen: list[list[int]] = []   # the committed steps at each poll
        self.checked: set[int] = set()
        self.errors: list[str] = []

    def poll(self, check: bool = True) -> list[int]:
        from store.errors import StoreNotFound

        try:
            if self.rs is None:
                self.rs = RunStore(self.url)
            steps = self.rs.steps().tolist()
        except StoreNotFound:
            return []  # not created yet
        self.seen.append(steps)
        if check:
            self.check(steps)
        return steps

    def check(self, steps: list[int]) -> None:
        rs = self.rs
        for s in steps:
            if s in self.checked:
                continue
            try:
                a = rs.activations(HOOK, s).astype(np.float32)
                assert np.isfinite(a).all(), "activations not all written"
                assert (np.abs(a).reshape(P, -1).max(axis=1) > 0).all(), "a zero sequence"
                assert np.array_equal(rs.tokens(s), rs.probe_tokens()), "inputs"
                assert all(np.isfinite(v).all() for v in rs.stats_at(HOOK, s).values())
                self.checked.add(s)
            except Exception as e:  # noqa: BLE001 - collected, asserted by the tests
                self.errors.append(f"step {s}: {type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def s3_run(s3, shakespeare_data, tmp_path_factory):
    """The run (RUN_STEPS steps, CAPTURE, the store on s3://), killed mid-capture, then
    resumed while the dashboard (AppTest on `store=<s3 URL>`) and a Watcher follow it: what
    was seen along the way, for the tests to assert."""
    t_fixture = time.monotonic()
    import s3fs

    from apptest_env import open_app
    from capture.schedule import Schedule
    from helpers import ok, popen, train_args
    from trainer import checkpoint

    url = _url("trained")
    base = tmp_path_factory.mktemp("s3run")
    run = base / "run"
    args = train_args(shakespeare_data, run, *CAPTURE, f"--capture.store={url}",
                      steps=RUN_STEPS)
    sched = Schedule(**SCHEDULE)
    caps = sched.steps("summary")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    watch = Watcher(url)
    out: dict = {"url": url, "sched": sched, "watch": watch, "run": run}
    t0 = time.monotonic()
    out["t_before"] = t0 - t_fixture

    p = popen(args)
    try:
        # Until a checkpoint exists the reader checks each capture as it appears. Then only
        # the next slot is watched: a capture writes its inputs first (then activations,
        # statistics, its done mark, the commit), so once the slot's first input chunk is
        # there (one HEAD) and the slot is still not committed (one read of the index),
        # the kill comes at once, inside that capture.
        steps: list[int] = []
        while True:
            if p.poll() is not None:
                o, e = p.communicate()
                pytest.fail(f"the run ended ({p.returncode}) before the kill:\n{o[-2000:]}\n"
                            f"{e[-3000:]}")
            if time.monotonic() - t0 > 300:
                pytest.fail("timed out waiting for a capture after a checkpoint")
            if checkpoint.latest_step(run) is None:
                steps = watch.poll()
                time.sleep(0.05)
                continue
            n = max(len(steps), 1)  # the next slot to be written (commits are in order)
            if n >= len(caps):
                pytest.fail(f"every capture was committed before the kill could land: {steps}")
            if fs.exists(_key(url, f"inputs/tokens/c.{n}.0.0")):
                steps = watch.poll(check=False)
                if len(steps) <= n:
                    break
            time.sleep(0.01)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
    out["t_kill"] = time.monotonic() - t0
    out["killed_rc"] = p.returncode
    out["after_kill"] = after = watch.poll()
    # slots with chunks stored but not committed (slot i is the i-th scheduled capture:
    # nothing was rolled back yet)
    out["torn"] = [i for i in _written_slots(fs, url) if i < len(caps) and caps[i] not in after]
    out["checkpoint"] = checkpoint.latest_step(run)

    with pytest.MonkeyPatch.context() as mp:
        p = popen([*args, "--resume"])
        try:
            # the dashboard opened on the s3 URL while the resumed run writes
            at = open_app(mp, runs_root=base, page="store", store=url)
            out["app_first"] = _app_view(at)
            out["app_first_while_running"] = p.poll() is None
            while p.poll() is None and time.monotonic() - t0 < 400:
                watch.poll()
                time.sleep(0.1)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            r_out, r_err = p.communicate()
        ok(subprocess.CompletedProcess(args, p.returncode, r_out, r_err))
        out["resume_out"] = r_out
        out["final"] = watch.poll()
        at.run()  # the rerun the page's live poll makes once the store changed
        out["app_last"] = _app_view(at)
        out["t_end"] = time.monotonic() - t0
    yield out


def _app_view(at) -> dict:
    """What the dashboard's Store page shows: the steps of its captures table, the sidebar's
    summary line and whether it says it follows the run live."""
    assert not at.exception and not at.error and not at.warning, \
        [str(e.value) for kind in ("exception", "error", "warning") for e in getattr(at, kind)]
    caps = [d.value for d in at.dataframe if "tiers" in d.value.columns]
    assert caps, "the Store page shows no captures table"
    t = caps[0]
    return {"steps": [int(s) for s, tiers in zip(t["step"], t["tiers"]) if tiers],
            "captions": [c.value for c in at.sidebar.caption],
            "markdown": [m.value for m in at.markdown]}


def test_trainer_on_s3_killed_and_resumed_reader_sees_only_whole_captures(s3_run):
    r, w = s3_run, s3_run["watch"]
    sched: list[int] = r["sched"].steps("summary")
    print(f"\nrun started {r['t_before']:.1f} s into the fixture; killed {r['t_kill']:.1f} s "
          f"later, resumed run done at {r['t_end']:.1f} s")
    # every capture the reader saw committed, mid-run and after, was whole
    assert w.errors == [], "\n".join(w.errors)
    assert w.checked == set(sched)
    assert all(s == sorted(s) and set(s) <= set(sched) for s in w.seen)
    # it saw them appear: several different numbers of committed captures along the way
    assert len({len(s) for s in w.seen}) >= 3, w.seen
    # the kill (-9, every process of the run) landed while a capture's chunks were being
    # stored: that capture is invisible, every capture before it is there
    assert r["killed_rc"] == -signal.SIGKILL
    assert r["torn"], "the kill did not land inside a capture"
    assert r["after_kill"] == sched[:min(r["torn"])], (r["after_kill"], r["torn"])
    # the resume redid the rest: every scheduled capture exactly once, with the schedule's
    # tiers and weight snapshots, one train metric per step, the run marked finished
    assert f"resumed from step {r['checkpoint']}" in r["resume_out"]
    rs = RunStore(r["url"])
    assert r["final"] == rs.steps().tolist() == sched
    assert rs.steps("full").tolist() == r["sched"].steps("full")
    assert rs.snapshot_steps() == r["sched"].steps("snapshot")
    assert rs.status == "finished"
    assert rs.metrics("train")["step"].tolist() == list(range(1, RUN_STEPS + 1))


def test_dashboard_follows_the_s3_run_live(s3_run):
    """Opened at `?store=s3://...` while the resumed run wrote, the Store page listed the
    captures committed then and said it follows the run; the rerun after the run's end lists
    every scheduled capture and follows no more."""
    first, last = s3_run["app_first"], s3_run["app_last"]
    sched = s3_run["sched"].steps("summary")
    assert s3_run["app_first_while_running"]
    assert set(first["steps"]) <= set(sched) and len(first["steps"]) < len(sched), first
    assert any(c.startswith("Live: this page follows the run") for c in first["captions"])
    assert any(s3_run["url"] in m for m in first["markdown"])
    assert last["steps"] == sched
    assert not any(c.startswith("Live:") for c in last["captions"]), last["captions"]
    assert any(c.startswith("finished ·") and f"captures {len(sched)} ({len(sched)} full)" in c
               for c in last["captions"]), last["captions"]


def test_export_reads_the_s3_run(s3_run, tmp_path):
    """`python -m capture.export --run-dir RUN --list` finds the run's store on s3 (its
    config's capture.store) and names every capture; `--store s3://... --step N --format
    npy` writes exactly what RunStore reads (activations and tokens)."""
    from helpers import ok, run_clis

    url, sched = s3_run["url"], s3_run["sched"].steps("summary")
    step = sched[-2]
    listed, exported = run_clis(  # side by side: each is mostly Python's start-up
        ["-m", "capture.export", "--run-dir", str(s3_run["run"]), "--list"],
        ["-m", "capture.export", "--store", url, "--step", str(step), "--format", "npy",
         "--hook", HOOK, "--out", str(tmp_path)])  # (one hook: each chunk is a request)
    assert f"store: {url}" in ok(listed).stdout
    assert (f"steps: {len(sched)} captured ({len(sched)} full): "
            + ", ".join(f"{s}F" for s in sched)) in listed.stdout, listed.stdout
    ok(exported)
    rs = RunStore(url)
    got = tmp_path / f"step_{step}"
    assert sorted(p.name for p in got.iterdir()) == sorted([f"{HOOK}.npy", "tokens.npy"])
    a = np.load(got / f"{HOOK}.npy")
    assert a.dtype == np.float16 and a.shape == (P, 32, 32)
    assert np.array_equal(a, rs.activations(HOOK, step))
    assert np.array_equal(np.load(got / "tokens.npy"), rs.tokens(step))


def test_a_missing_bucket_is_one_line(s3):
    """The bucket is the user's to create: writing into one that does not exist is one line
    naming the store (the trainer prints it as `error: ...`), not a traceback from zarr."""
    with pytest.raises(StoreError, match=r"^cannot create the capture store at "
                       r"s3://no-such-bucket/run/capture\.zarr: FileNotFoundError: .*bucket"):
        StoreWriter.create_or_open("s3://no-such-bucket/run/capture.zarr", u.layout())


def test_dashboard_pages_on_the_s3_store(s3_run, monkeypatch, tmp_path):
    """The Training page draws the s3 run from its store (its captures counted), saying only
    that the text samples, which live in a run folder's metrics.jsonl, are not available;
    the Prompt page, which needs the run folder, says so in one sentence."""
    from apptest_env import open_app

    url, n = s3_run["url"], len(s3_run["sched"].steps("summary"))
    at = open_app(monkeypatch, runs_root=tmp_path, page="training", store=url)
    assert not at.error and not at.warning, [e.value for e in (*at.error, *at.warning)]
    assert {m.label: m.value for m in at.metric}["Captures"] == str(n)
    assert [i.value for i in at.info] == [
        "Text samples are not available: they are in the metrics.jsonl of the run folder "
        "holding the store, and this store has none beside it."]
    at = open_app(monkeypatch, runs_root=tmp_path, page="prompt", store=url)
    assert not at.error and not at.warning
    assert any(i.value.startswith("Running text needs the run's folder") for i in at.info)
    # `--run-dir RUN` of the run: its config.toml's capture.store leads to the s3 store.
    at = open_app(monkeypatch, run_dir=s3_run["run"], page="training")
    assert not at.error and not at.warning, [e.value for e in (*at.error, *at.warning)]
    assert {m.label: m.value for m in at.metric}["Captures"] == str(n)

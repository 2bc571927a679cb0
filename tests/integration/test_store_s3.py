"""The capture store on an S3 object store: a local S3 server (moto_server) on 127.0.0.1,
reached through s3fs with the endpoint taken from the environment (AWS_ENDPOINT_URL_S3).
A store written to s3://BUCKET/... reads back equal; a reader polling a live writer sees
only complete captures; a writer killed (-9) mid-capture leaves nothing torn visible. Object
stores have no rename: a chunk is one whole-object PUT, and the commit is the PUT of the
`captures/step` chunk, so these hold without one."""

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
        _, w_err = writer.communicate(timeout=90)
        assert writer.returncode == 0, w_err
        r_out, r_err = reader.communicate(timeout=90)
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

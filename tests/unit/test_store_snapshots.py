"""Weight snapshots in the store: files under snapshots/<8-digit step>/, visible only once
their marker snapshot.json exists (written last): a round trip, a writer killed (-9)
between the files and the marker, rollback_after withdrawing later snapshots, and files
that do not match their marker."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

import store_util as u
from store.errors import CorruptStore, StoreError
from store.reader import RunStore
from store.snapshots import MARKER, snapshot_key
from store.writer import StoreWriter


def files(step: int) -> dict[str, bytes]:
    weights = bytes((step * 7 + i) % 256 for i in range(1000 + step % 1000))
    return {"model.safetensors": weights, "config.json": json.dumps({"step": step}).encode()}


def _store(tmp_path) -> tuple[str, StoreWriter]:
    url = str(tmp_path / "capture.zarr")
    return url, StoreWriter.create_or_open(url, u.layout())


def test_snapshot_round_trip(tmp_path):
    url, w = _store(tmp_path)
    rs = RunStore(url)
    assert rs.snapshot_steps() == [] and w.snapshot_steps() == []
    with pytest.raises(StoreError) as e:
        rs.snapshot_file(100)
    assert "no weight snapshot at step 100" in str(e.value) and "none" in str(e.value)
    for step in (1200, 100, 99_999_999):
        w.write_snapshot(step, files(step))
    assert rs.snapshot_steps() == [100, 1200, 99_999_999]  # the live reader sees them
    for step in rs.snapshot_steps():
        assert rs.snapshot_file(step) == files(step)["model.safetensors"]
        assert rs.snapshot_file(step, "config.json") == files(step)["config.json"]
    folder = tmp_path / "capture.zarr" / "snapshots" / "00001200"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                        MARKER]
    marker = json.loads((folder / MARKER).read_text())
    assert marker["step"] == 1200 and marker["written_at"]
    assert marker["files"] == {n: len(b) for n, b in files(1200).items()}
    with pytest.raises(StoreError, match="no weight snapshot at step 150 .*snapshots: 100, "
                                         "1200, 99999999"):
        rs.snapshot_file(150)
    with pytest.raises(StoreError, match="has no file 'optimizer.pt'; it has model"):
        rs.snapshot_file(100, "optimizer.pt")
    # a snapshot of a step written again replaces it
    w.write_snapshot(100, {"model.safetensors": b"new weights"})
    assert rs.snapshot_file(100) == b"new weights"
    with pytest.raises(StoreError, match="has no file 'config.json'"):
        rs.snapshot_file(100, "config.json")
    for bad in ({}, {MARKER: b"x"}, {"": b"x"}, {"a/b": b"x"}, {".hidden": b"x"}):
        with pytest.raises(StoreError):
            w.write_snapshot(5, bad)
    assert rs.snapshot_steps() == [100, 1200, 99_999_999]


def test_files_without_their_marker_are_no_snapshot(tmp_path):
    url, w = _store(tmp_path)
    w.write_snapshot(100, files(100))
    for name, data in files(200).items():  # the files, through the writer's sink, no marker
        w._sink.put(snapshot_key(200, name), data)
    assert (tmp_path / "capture.zarr" / "snapshots" / "00000200" / "model.safetensors").exists()
    rs = RunStore(url)
    assert rs.snapshot_steps() == [100]
    with pytest.raises(StoreError, match="no weight snapshot at step 200"):
        rs.snapshot_file(200)


KILLED = """
import time, test_store_snapshots as t
from store.writer import StoreWriter
w = StoreWriter.open({url!r})
w.write_snapshot(100, t.files(100))
def cut():                    # the flush between the files and the marker: killed there
    print("files written", flush=True)
    time.sleep(60)
w._barrier = cut
w.write_snapshot(200, t.files(200))
"""


def test_a_writer_killed_between_files_and_marker_leaves_no_snapshot(tmp_path):
    url, w = _store(tmp_path)
    p = u.run_py(KILLED.format(url=url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == "files written", p.stderr.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    folder = tmp_path / "capture.zarr" / "snapshots" / "00000200"
    assert (folder / "model.safetensors").read_bytes() == files(200)["model.safetensors"]
    assert not (folder / MARKER).exists()
    rs = RunStore(url)
    assert rs.snapshot_steps() == [100]
    assert rs.snapshot_file(100) == files(100)["model.safetensors"]
    with pytest.raises(StoreError, match="no weight snapshot at step 200 in .*; snapshots: 100$"):
        rs.snapshot_file(200)
    # the resumed run writes it again: now it is whole
    w.write_snapshot(200, files(200))
    assert rs.snapshot_steps() == [100, 200]
    assert rs.snapshot_file(200, "config.json") == files(200)["config.json"]


def test_rollback_after_withdraws_later_snapshots(tmp_path):
    url, w = _store(tmp_path)
    for step in (100, 200, 300):
        w.write_snapshot(step, files(step))
    rs = RunStore(url)
    assert w.rollback_after(200) == []
    assert rs.snapshot_steps() == [100, 200]
    with pytest.raises(StoreError, match="no weight snapshot at step 300"):
        rs.snapshot_file(300)
    w.write_snapshot(300, {"model.safetensors": b"redone"})  # the resumed run's own
    assert rs.snapshot_file(300) == b"redone"
    w2 = StoreWriter.create_or_open(url, u.layout())  # a fresh start into the same store
    assert w2.rollback_after(-1) == [] and rs.snapshot_steps() == []


def test_a_file_that_does_not_match_its_marker_is_corrupt(tmp_path):
    url, w = _store(tmp_path)
    w.write_snapshot(100, files(100))
    folder = tmp_path / "capture.zarr" / "snapshots" / "00000100"
    rs = RunStore(url)
    (folder / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(CorruptStore) as e:
        rs.snapshot_file(100)
    assert str(e.value) == (f"snapshot 100 of {url} is corrupt: model.safetensors is 3 bytes, "
                            f"its marker says 1100")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CorruptStore, match="model.safetensors is missing, its marker says 1100"):
        rs.snapshot_file(100)
    assert rs.snapshot_file(100, "config.json") == files(100)["config.json"]
    (folder / MARKER).write_bytes(b"{not json")
    with pytest.raises(CorruptStore, match=f"its {MARKER} cannot be read") as e:
        rs.snapshot_file(100, "config.json")
    assert "\n" not in str(e.value)


def test_snapshots_on_an_object_store(tmp_path):
    url = "memory://runs/snap.zarr"
    w = StoreWriter.create_or_open(url, u.layout())
    w.write_snapshot(7, files(7))
    rs = RunStore(url)
    assert rs.snapshot_steps() == [7]
    assert rs.snapshot_file(7) == files(7)["model.safetensors"]
    w.rollback_after(6)
    assert rs.snapshot_steps() == []

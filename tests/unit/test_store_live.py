"""A store read while it is written: a reader process polling a writer process never errors
and sees only complete captures; a writer killed (-9) mid-capture leaves the torn capture
invisible and the store readable and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
import zarr

import store_util as u
from store.errors import StoreError
from store.reader import RunStore
from store.writer import StoreWriter

N = 24
STEPS = [3 * i + 1 for i in range(N)]
SUMMARY_ONLY = set(STEPS[1::3])  # every third capture keeps no activations

def _live(tmp_path, caps: list, max_steps: int) -> dict:
    url = str(tmp_path / "capture.zarr")
    reader = u.run_py(u.LIVE_READER.format(url=url, caps=caps, flag=url + ".reader", newest=2,
                                          verify_all=True, pause=0), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    writer = u.run_py(u.LIVE_WRITER.format(url=url, caps=caps, max_steps=max_steps,
                                          flag=url + ".reader"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    w_out, w_err = writer.communicate(timeout=90)
    assert writer.returncode == 0, w_err
    r_out, r_err = reader.communicate(timeout=90)
    assert reader.returncode == 0, r_err
    res = json.loads(r_out.strip().splitlines()[-1])
    assert res["errors"] == [], "\n".join(res["errors"])
    steps = [step for _, step, _ in caps]
    assert res["final"] == steps and res["verified"] == steps
    assert res["last_metric"] == steps[-1]
    return res


def test_reader_polling_a_live_writer_sees_only_complete_captures(tmp_path):
    caps = [[slot, step, step not in SUMMARY_ONLY] for slot, step in enumerate(STEPS)]
    res = _live(tmp_path, caps, max(STEPS))
    # it really read mid-run: many polls, at many different numbers of committed captures
    assert res["polls"] > N // 2 and res["distinct"] >= 4, res


def test_reader_polling_across_a_growth_of_the_capture_axis(tmp_path):
    """Slots 1020..1030: the writer grows every array at 1024 while the reader polls; and
    its metrics grow past max_steps (5) as it goes."""
    caps = [[slot, STEPS[i], STEPS[i] not in SUMMARY_ONLY]
            for i, slot in enumerate(range(1020, 1031))]
    res = _live(tmp_path, caps, 5)
    assert res["polls"] > 5 and res["distinct"] >= 3, res
    g = zarr.open_group(str(tmp_path / "capture.zarr"), mode="r")
    assert g["captures/step"].shape == (2048,) and g["metrics/train/loss"].shape == (4096,)


KILLED = """
import numpy as np, store_util as u
from store.writer import StoreWriter
url = {url!r}
w0 = StoreWriter.create_or_open(url, u.layout())
w1 = StoreWriter.open(url)
for rank, w in enumerate((w0, w1)):
    u.write_part(w, 0, 0, rank, 2)
w0.commit(0, 0)
u.write_part(w1, 1, 5, 1, 2)        # rank 1's part of step 5 is done, rank 0's never will be
first = True
while True:                          # rank 0 writing step 5's chunks when the kill comes
    u.write_part(w0, 1, 5, 0, 2, done=False)
    if first:
        print("writing", flush=True)
        first = False
"""


def test_kill_9_mid_capture_leaves_it_invisible_and_the_store_resumable(tmp_path):
    url = str(tmp_path / "capture.zarr")
    p = u.run_py(KILLED.format(url=url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL

    rs = RunStore(url)
    assert rs.steps().tolist() == [0]
    u.check_capture(rs, 0)
    with pytest.raises(StoreError, match="step 5 is not captured; nearest captured steps: "
                                         "before 0"):
        rs.activations("blocks.0.hook_resid_post", 5)  # a torn capture is not readable
    g = zarr.open_group(url, mode="r")  # plain zarr agrees: nothing points at slot 1
    assert g["captures/step"][:3].tolist() == [0, -1, -1]
    assert g["captures/done"][1].tolist() == [0, 1]

    # resume from the checkpoint at step 0: slot 1 is redone from scratch
    w0 = StoreWriter.create_or_open(url, u.layout())
    assert w0.rollback_after(0) == []
    assert g["captures/done"][1].tolist() == [0, 0]
    w1 = StoreWriter.open(url)
    for rank, w in enumerate((w0, w1)):
        u.write_part(w, 1, 5, rank, 2)
    w0.commit(1, 5)
    assert rs.steps().tolist() == [0, 5]
    u.check_capture(rs, 5)
    np.testing.assert_array_equal(rs.stat("blocks.1.mlp.hook_post", "std")[1],
                                  np.stack([u.stats(s, "blocks.1.mlp.hook_post")["std"]
                                            for s in (0, 5)]))

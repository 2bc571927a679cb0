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

WRITER = """
import os, time, numpy as np, store_util as u
from store.schema import FULL, SUMMARY
from store.writer import StoreWriter
url, caps, max_steps = {url!r}, {caps!r}, {max_steps!r}
w0 = StoreWriter.create_or_open(url, u.layout(max_steps=max_steps))
w1 = StoreWriter.open(url)
w0.set_status("training")
t0 = time.monotonic()
while not os.path.exists(url + ".reader") and time.monotonic() - t0 < 30:
    time.sleep(0.005)               # the reader has the store open: captures start now
for slot, step, full in caps:
    w0.reserve(slot)                # grows every array at slot 1024, the reader polling
    for rank, w in enumerate((w0, w1)):
        u.write_part(w, slot, step, rank, 2, pause=0.004, full=full)  # readers poll mid-capture
    while not w0.all_done(slot):
        time.sleep(0.001)
    w0.commit(slot, step, SUMMARY | FULL if full else SUMMARY)
    w0.write_metrics("train", np.arange(max(1, step - 2), step + 1),
                     {{"loss": np.array([u.loss(s) for s in range(max(1, step - 2), step + 1)],
                                        np.float32)}})
w0.set_status("finished")
"""

READER = """
import json, time, traceback, numpy as np, store_util as u
from store.reader import RunStore
from store.errors import StoreNotFound
url, caps = {url!r}, {caps!r}
full_of = {{step: full for _, step, full in caps}}
t0 = time.monotonic()
while True:
    try:
        rs = RunStore(url)
        open(url + ".reader", "w").close()
        break
    except StoreNotFound:
        time.sleep(0.005)
polls, verified, seen, errors, counts, last = 0, set(), set(), [], [], None
def verify(s):
    assert rs.tiers()[s] == (["summary", "full"] if full_of[s] else ["summary"])
    u.check_capture(rs, s, full_of[s])
    verified.add(s)
while time.monotonic() - t0 < 60:
    try:
        done = rs.status == "finished"
        steps = rs.steps().tolist()
        polls += 1
        counts.append(len(steps))
        assert steps == sorted(steps) and set(steps) <= set(full_of)
        new = [s for s in steps if s not in verified]
        for s in new[-2:]:          # the newest: most likely to race the writer
            verify(s)
        if steps:
            st, v = rs.stat("blocks.0.hook_resid_post", "mean", neuron=2)
            assert st.tolist()[:len(steps)] == steps   # a commit may land between reads
            assert v.tolist() == [u.stats(s, "blocks.0.hook_resid_post")["mean"][2]
                                  for s in st.tolist()]
            full = rs.steps("full").tolist()
            assert set(full) <= {{s for s in full_of if full_of[s]}}
        m = rs.metrics("train")
        assert np.array_equal(m["loss"], [u.loss(s) for s in m["step"]])
        if done:
            for s in steps:
                if s not in verified:
                    verify(s)
            last = int(m["step"][-1])
            break
    except Exception:
        errors.append(traceback.format_exc(limit=3))
        if len(errors) > 3:
            break
print(json.dumps(dict(polls=polls, verified=sorted(verified), errors=errors,
                      distinct=len(set(counts)), final=steps, last_metric=last)))
"""


def _live(tmp_path, caps: list, max_steps: int) -> dict:
    url = str(tmp_path / "capture.zarr")
    reader = u.run_py(READER.format(url=url, caps=caps), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    writer = u.run_py(WRITER.format(url=url, caps=caps, max_steps=max_steps),
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

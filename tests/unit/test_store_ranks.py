"""The writer's commit protocol with real rank processes, read back through RunStore and
through plain zarr-python; the append-only capture axis and its growth past 1024 slots;
rollback and resume (another schedule, another world size)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import store_util as u
from store import CorruptStore, Layout, StoreError
from store.reader import RunStore
from store.schema import SLOT_BLOCK
from store.writer import StoreWriter

STEPS = [0, 5, 10, 15]


def _rank_processes(tmp_path, url: str, captures: list) -> None:
    """Rank 0's create_or_open here, as the trainer; then two rank processes write every
    capture, rank 0 reserving each slot before rank 1 writes it."""
    ready = tmp_path / "ready"
    procs = [u.run_py(f"import store_util as u; u.rank_worker({url!r}, {r}, 2, "
                      f"{captures!r}, {str(ready)!r})") for r in range(2)]
    w = StoreWriter.create_or_open(url, u.layout())
    w.write_metrics("train", np.arange(1, 21), {"loss": np.array([u.loss(s) for s in
                                                                  range(1, 21)], np.float32)})
    w.set_status("training")
    ready.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    w.set_status("finished")


def test_two_rank_processes_write_their_halves_concurrently(tmp_path):
    url = str(tmp_path / "capture.zarr")
    _rank_processes(tmp_path, url, [list(x) for x in enumerate(STEPS)])

    rs = RunStore(url)
    assert rs.steps().tolist() == STEPS and rs.status == "finished"
    assert rs.steps("full").tolist() == STEPS
    for step in STEPS:
        u.check_capture(rs, step)
    steps, vals = rs.stat("blocks.1.mlp.hook_post", "max", neuron=150)
    assert steps.tolist() == STEPS
    np.testing.assert_array_equal(vals, [u.stats(s, "blocks.1.mlp.hook_post")["max"][150]
                                         for s in STEPS])
    m = rs.metrics("train")
    assert m["step"].tolist() == list(range(1, 21))
    np.testing.assert_array_equal(m["loss"], [u.loss(s) for s in range(1, 21)])
    assert np.isnan(m["lr"]).all() and rs.metrics("val")["step"].size == 0
    np.testing.assert_array_equal(rs.probe_tokens(), u.probe())

    # the same through plain zarr-python, no project code
    g = zarr.open_group(url, mode="r")
    assert g.attrs["schema_version"] == 2 and g.attrs["status"] == "finished"
    assert g.attrs["model"] == {"n_layer": 3, "n_embd": 16}
    assert g["captures/step"][:5].tolist() == STEPS + [-1]
    assert g["captures/tier"][:5].tolist() == [3, 3, 3, 3, 0]
    assert g["captures/done"][:5].tolist() == [[1, 1]] * 4 + [[0, 0]]
    for slot, step in enumerate(STEPS):
        for hook in u.HOOKS:
            np.testing.assert_array_equal(g[f"acts/{hook}"][slot], u.acts(step, hook, range(4)))
            np.testing.assert_array_equal(g[f"stats/{hook}/frac_active"][slot],
                                          u.stats(step, hook)["frac_active"])
            np.testing.assert_array_equal(g[f"topk/{hook}/index"][slot], u.topk(step, hook)[1])
        np.testing.assert_array_equal(g["inputs/tokens"][slot], u.tokens(step, range(4)))
        np.testing.assert_array_equal(g["attn/2"][slot, 1], u.attn(step, 2, 1))
    loss = g["metrics/train/loss"][:]
    np.testing.assert_array_equal(loss, [u.loss(s) for s in range(1, 21)])
    # each sequence is its own chunk file: rank-aligned for any world size dividing P
    acts_dir = tmp_path / "capture.zarr" / "acts" / "blocks.0.hook_resid_post"
    assert sorted(p.name for p in acts_dir.glob("c.*")) == sorted(
        f"c.{c}.{s}.0.0" for c in range(4) for s in range(4))


def test_two_rank_processes_across_a_growth_of_the_capture_axis(tmp_path):
    """Slots 1020..1030: rank 0 grows every array at slot 1024; rank 1, whose writer was
    opened at 1024 slots, notices by itself and writes its half of the new slots."""
    url = str(tmp_path / "capture.zarr")
    caps = [[slot, 100 + 10 * i] for i, slot in enumerate(range(1020, 1031))]
    _rank_processes(tmp_path, url, caps)
    rs = RunStore(url)
    want = [s for _, s in caps]
    assert rs.steps().tolist() == want
    for step in want:
        u.check_capture(rs, step)
    g = zarr.open_group(url, mode="r")
    for path, a in g.members(max_depth=None):
        if isinstance(a, zarr.Array) and a.metadata.dimension_names[0] == "capture":
            assert a.shape[0] == 2 * SLOT_BLOCK, path
    assert g["captures/step"][1019:1032].tolist() == [-1] + want + [-1]
    assert StoreWriter.open(url).next_slot() == 1031


def test_slot_invisible_until_every_rank_done_and_committed(tmp_path):
    url = str(tmp_path / "s.zarr")
    w0 = StoreWriter.create_or_open(url, u.layout())
    w1 = StoreWriter.open(url)
    rs = RunStore(url)
    u.write_part(w0, 0, 0, 0, 2)
    assert not w0.all_done(0)
    with pytest.raises(StoreError, match="ranks 1 have not marked it done"):
        w0.commit(0, 0)
    u.write_part(w1, 0, 0, 1, 2, done=False)
    assert not w0.all_done(0) and rs.steps().size == 0
    w1.mark_done(0, 1)
    assert w0.all_done(0)
    assert rs.steps().size == 0  # every part written, still not committed: invisible
    with pytest.raises(StoreError, match="no committed captures yet"):
        rs.activations("blocks.0.hook_resid_post", 0)
    w0.commit(0, 0)
    assert rs.steps().tolist() == [0] and w0.next_slot() == 1
    u.check_capture(rs, 0)
    with pytest.raises(StoreError, match="rank 2 is out of range"):
        w0.mark_done(1, 2)
    # a slot past the capacity is refused until rank 0 reserves it
    with pytest.raises(StoreError, match="slot 1024 is out of range: the store has 1024"):
        u.write_part(w1, 1024, 7, 1, 2)
    w0.reserve(1024)
    u.write_part(w1, 1024, 7, 1, 2)  # w1 opened at 1024 slots: it notices the growth
    u.write_part(w0, 1024, 7, 0, 2)
    assert rs.steps().tolist() == [0]
    w0.commit(1024, 7)
    assert rs.steps().tolist() == [0, 7] and w0.next_slot() == 1025
    u.check_capture(rs, 7)
    assert zarr.open_group(url, mode="r")["acts/blocks.1.mlp.hook_post"].shape[0] == 2048


def _writers(url, world=2):
    return [StoreWriter.open(url) for _ in range(world)]


def test_rollback_then_append_overwrites_the_rolled_back_slots(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout())
    ws = _writers(url)
    for slot, step in enumerate(STEPS):
        u.append(ws, slot, step)
    u.write_part(ws[1], 4, 20, 1, 2)  # a torn capture beyond: one rank's flag only
    rs = RunStore(url)
    assert rs.steps().tolist() == STEPS
    assert w.rollback_after(5) == [2, 3]
    assert rs.steps().tolist() == [0, 5] and w.next_slot() == 2
    assert not any(w.all_done(c) for c in (2, 3, 4)) and w.all_done(1)
    g = zarr.open_group(url, mode="r")
    assert g["captures/step"][:5].tolist() == [0, 5, -1, -1, -1]
    assert g["captures/done"][:5].tolist() == [[1, 1], [1, 1], [0, 0], [0, 0], [0, 0]]
    # the resumed run appends at next_slot, on another schedule: slot 2 becomes a
    # summary-only capture of step 7 (its stale full chunks of step 10 are never read)
    u.append(ws, 2, 7, full=False)
    u.append(ws, 3, 9)
    assert rs.steps().tolist() == [0, 5, 7, 9] and rs.steps("full").tolist() == [0, 5, 9]
    assert rs.tiers() == {0: ["summary", "full"], 5: ["summary", "full"], 7: ["summary"],
                          9: ["summary", "full"]}
    u.check_capture(rs, 7, full=False)
    u.check_capture(rs, 9)
    with pytest.raises(StoreError, match="step 10 is not captured"):
        rs.stats_at("blocks.0.hook_resid_post", 10)
    assert w.rollback_after(-1) == [0, 1, 2, 3]  # a fresh start into the same store
    assert rs.steps().size == 0 and w.next_slot() == 0
    assert not any(w.all_done(c) for c in range(5))


def test_resume_with_another_schedule_appends_into_the_same_store(tmp_path):
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout(max_steps=10))
    ws = _writers(url)
    u.append(ws, 0, 0)
    u.append(ws, 1, 5)
    rs = RunStore(url)  # a live reader, open across the resume
    assert rs.steps().tolist() == [0, 5]

    # resumed from a checkpoint at 5 on 4 ranks, another cadence and a longer run
    w = StoreWriter.create_or_open(url, u.layout(world=4, max_steps=30))
    assert w.rollback_after(5) == [] and w.next_slot() == 2
    g = zarr.open_group(url, mode="r")
    assert g["acts/blocks.1.mlp.hook_post"].shape == (SLOT_BLOCK, 4, 8, 200)
    assert g["captures/done"].shape == (SLOT_BLOCK, 4) and g["metrics/val/loss"].shape == (30,)
    assert g.attrs["layout"]["world"] == 4 and g.attrs["layout"]["max_steps"] == 30
    ws = _writers(url, 4)
    for slot, step in ((2, 7), (3, 9), (4, 12)):
        u.append(ws, slot, step, full=step != 9)
    assert rs.steps().tolist() == [0, 5, 7, 9, 12]  # the union, seen by the live reader
    for s in (0, 5, 7, 12):
        u.check_capture(rs, s)
    u.check_capture(rs, 9, full=False)
    w.write_metrics("val", np.array([25, 30]), {"loss": np.array([1.5, 1.25], np.float32)})
    assert rs.metrics("val")["step"].tolist() == [25, 30]  # the grown metrics, no refresh
    assert rs.world == 2
    rs.refresh()
    assert rs.world == 4

    # resumed again from a checkpoint at 7: the captures after it are redone
    w = StoreWriter.create_or_open(url, u.layout(world=2, max_steps=30))
    assert w.rollback_after(7) == [3, 4] and w.next_slot() == 3
    ws = _writers(url, 2)
    u.append(ws, 3, 8)
    u.append(ws, 4, 10)
    assert rs.steps().tolist() == [0, 5, 7, 8, 10]
    u.check_capture(rs, 8)
    u.check_capture(rs, 10)

    bad = [
        (u.layout(hooks={"blocks.0.hook_resid_post": 16}), "act_hooks"),
        (u.layout(stat_hooks={"blocks.0.hook_resid_post": 16}), "stat_hooks"),
        (u.layout(source="train"), "source probe -> train"),
        (u.layout(attn_len=4), "attn_len 8 -> 4"),
        (u.layout(token_loss=True), "token_loss False -> True"),
    ]
    for lay, msg in bad:
        with pytest.raises(StoreError, match=msg) as e:
            StoreWriter.create_or_open(url, lay)
        assert "\n" not in str(e.value) and "another capture layout" in str(e.value)
    other = u.layout()
    other.probe_tokens = other.probe_tokens + 1
    with pytest.raises(StoreError, match="another probe set"):
        StoreWriter.create_or_open(url, other)
    assert rs.steps().tolist() == [0, 5, 7, 8, 10]  # refused resumes changed nothing


def test_a_grow_cut_off_midway_is_completed_later(tmp_path):
    """A crash inside reserve leaves some arrays longer than captures/step: the store stays
    readable and resumable, and the next reserve finishes the growth."""
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout())
    ws = _writers(url)
    u.append(ws, 0, 3)
    for path in ("captures/tier", "captures/done", "acts/blocks.0.hook_resid_post"):
        a = zarr.open_array(url, path=path, mode="r+")
        a.resize((2 * SLOT_BLOCK, *a.shape[1:]))
    rs = RunStore(url)
    u.check_capture(rs, 3)
    w = StoreWriter.create_or_open(url, u.layout())
    assert w.rollback_after(3) == [] and w.next_slot() == 1
    ws = [w, StoreWriter.open(url)]
    u.append(ws, 1, 4)
    u.append(ws, SLOT_BLOCK, 5)
    assert rs.steps().tolist() == [3, 4, 5]
    for s in (3, 4, 5):
        u.check_capture(rs, s)


def test_train_source_and_fsspec_urls(tmp_path):
    """file:// URLs (LocalStore under the hood) and a non-local fsspec URL (memory://,
    through zarr's FsspecStore and the writer's async chunk sink), grown past 1024 slots."""
    for url in ("file://" + str(tmp_path / "f.zarr"), "memory://runs/m.zarr"):
        lay = u.layout(source="train")
        StoreWriter.create_or_open(url, lay)
        ws = _writers(url)
        u.append(ws, 0, 3)
        u.append(ws, 1, 6, full=False)
        u.append(ws, SLOT_BLOCK + 1, 9)
        rs = RunStore(url)
        assert rs.steps().tolist() == [3, 6, 9] and rs.probe_tokens() is None
        u.check_capture(rs, 6, full=False)
        u.check_capture(rs, 9)
        if url.startswith("file://"):
            assert (tmp_path / "f.zarr" / "zarr.json").exists()
            assert "probe" not in zarr.open_group(str(tmp_path / "f.zarr"), mode="r")


def test_layout_validation():
    for kw, msg in [(dict(hooks={"a/b": 4}), "cannot name a zarr node"),
                    (dict(source="x"), "source must be one of"),
                    (dict(world=0), "world must be at least 1"),
                    (dict(stat_hooks={"blocks.0.hook_resid_post": 17}), "has two widths"),
                    (dict(max_steps=-1), "max_steps must be >= 0")]:
        with pytest.raises(StoreError, match=msg):
            u.layout(**kw)
    assert u.layout(attn_len=0).attn_len == u.T and u.layout(attn_len=99).attn_len == u.T
    assert u.layout(attn_len=3).attn_len == 3
    lay = u.layout(stat_hooks={"blocks.2.hook_resid_post": 24})
    assert lay.widths == {"blocks.2.hook_resid_post": 24, **u.HOOKS}
    assert u.layout().stat_hooks == u.HOOKS  # default: the act hooks
    with pytest.raises(StoreError, match="needs probe_tokens"):
        Layout(4, 8, {"h": 4}, 2, [], 1, 0, 5, 1, "probe", {})
    with pytest.raises(StoreError, match="own names"):
        Layout(4, 8, {"h": 4}, 2, [], 1, 0, 5, 1, "train", {"status": 1})
    lay = u.layout(token_loss=True, attn_len=5, **u.DYNAMICS)
    back = Layout.from_json(lay.to_json(), lay.attrs, lay.probe_tokens,
                            u.DYNAMICS["repeated_tokens"])
    assert back.to_json() == lay.to_json()


def test_corrupt_chunk_is_a_one_line_error(tmp_path):
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout())
    u.append(_writers(url), 0, 0)
    (tmp_path / "s.zarr" / "stats" / "blocks.0.hook_resid_post" / "mean" / "c.0.0").write_bytes(
        b"garbage")
    rs = RunStore(url)
    with pytest.raises(CorruptStore, match="cannot read stats/blocks.0.hook_resid_post/mean") as e:
        rs.stats_at("blocks.0.hook_resid_post", 0)
    assert "\n" not in str(e.value)


def test_arrays_with_other_codecs_are_written_through_zarr(tmp_path):
    """The writer encodes chunks itself only for the codecs it knows (bytes [+ zstd]); an
    array made otherwise (say, by a later tool re-encoding it) goes through zarr's setitem."""
    from zarr.codecs import BloscCodec

    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout())
    hook = "blocks.1.mlp.hook_post"
    old = zarr.open_array(url, path=f"acts/{hook}", mode="r")
    zarr.create_array(url, name=f"acts/{hook}", shape=old.shape, chunks=(1, 2, 8, 200),
                      dtype="float16", fill_value=np.nan, compressors=BloscCodec(),
                      overwrite=True)
    old = zarr.open_array(url, path=f"stats/{hook}/mean", mode="r")
    zarr.create_array(url, name=f"stats/{hook}/mean", shape=old.shape, chunks=old.chunks,
                      dtype="float32", fill_value=np.nan, compressors=BloscCodec(),
                      overwrite=True)
    u.append(_writers(url), 1, 5)
    u.check_capture(RunStore(url), 5)


def test_stat_of_one_neuron_a_slice_and_all(tmp_path):
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout())
    ws = _writers(url)
    u.append(ws, 0, 10)
    u.append(ws, 1, 0, full=False)  # committed steps need not increase with the slot
    rs = RunStore(url)
    hook = "blocks.0.hook_resid_post"
    steps, all_ = rs.stat(hook, "mean")
    assert steps.tolist() == [0, 10]
    np.testing.assert_array_equal(all_, [u.stats(0, hook)["mean"], u.stats(10, hook)["mean"]])
    _, one = rs.stat(hook, "mean", 3)
    np.testing.assert_array_equal(one, all_[:, 3])
    _, block = rs.stat(hook, "mean", slice(2, 6))
    np.testing.assert_array_equal(block, all_[:, 2:6])
    with pytest.raises(StoreError, match="unknown statistic"):
        rs.stat(hook, "median")

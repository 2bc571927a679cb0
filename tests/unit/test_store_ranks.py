"""The writer's commit protocol with real rank processes, read back through RunStore and
through plain zarr-python; rollback and resume (extension, another world size)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import test_store_util as u
from store import CorruptStore, Layout, StoreError
from store.reader import RunStore
from store.writer import StoreWriter

STEPS = [0, 5, 10, 15]


def test_two_rank_processes_write_their_halves_concurrently(tmp_path):
    url = str(tmp_path / "capture.zarr")
    ready = tmp_path / "ready"
    procs = [u.run_py(f"import test_store_util as u; u.rank_worker({url!r}, {r}, 2, "
                      f"{STEPS!r}, {str(ready)!r})") for r in range(2)]
    w = StoreWriter.create_or_open(url, u.layout(STEPS))  # rank 0's create, as the trainer
    w.write_metrics("train", np.arange(1, 21), {"loss": np.array([u.loss(s) for s in
                                                                  range(1, 21)], np.float32)})
    w.set_status("training")
    ready.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0
    w.set_status("finished")

    rs = RunStore(url)
    assert rs.steps().tolist() == STEPS and rs.status == "finished"
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
    assert g.attrs["schema_version"] == 1 and g.attrs["status"] == "finished"
    assert g.attrs["model"] == {"n_layer": 3, "n_embd": 16}
    assert g["captures/step"][:].tolist() == STEPS
    assert g["captures/done"][:].tolist() == [[1, 1]] * 4
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


def test_slot_invisible_until_every_rank_done_and_committed(tmp_path):
    url = str(tmp_path / "s.zarr")
    w0 = StoreWriter.create_or_open(url, u.layout(STEPS))
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
    with pytest.raises(StoreError, match="slot 0 is for step 0, not 5"):
        w0.commit(0, 5)
    w0.commit(0, 0)
    assert rs.steps().tolist() == [0]
    u.check_capture(rs, 0)
    with pytest.raises(StoreError, match="rank 2 is out of range"):
        w0.mark_done(1, 2)
    with pytest.raises(StoreError, match="slot 4 is out of range"):
        w0.write_acts("blocks.0.hook_resid_post", 4, 0, u.acts(0, "blocks.0.hook_resid_post",
                                                                range(2)))


def _commit_all(url, steps, world=2):
    ws = [StoreWriter.open(url) for _ in range(world)]
    for slot, step in steps:
        for r, w in enumerate(ws):
            u.write_part(w, slot, step, r, world)
        ws[0].commit(slot, step)


def test_rollback_after_uncommits_and_clears_done_flags(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout(STEPS))
    _commit_all(url, list(enumerate(STEPS)))
    rs = RunStore(url)
    assert rs.steps().tolist() == STEPS
    # a torn capture beyond: one rank's flag only
    assert w.rollback_after(5) == [2, 3]
    assert rs.steps().tolist() == [0, 5]
    assert not w.all_done(2) and not w.all_done(3) and w.all_done(1)
    g = zarr.open_group(url, mode="r")
    assert g["captures/step"][:].tolist() == [0, 5, -1, -1]
    assert g["captures/done"][:].tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]
    # the resumed run rewrites slot 2 in place: no duplicates, no holes
    _commit_all(url, [(2, 10)])
    assert rs.steps().tolist() == [0, 5, 10]
    u.check_capture(rs, 10)
    assert w.rollback_after(-1) == [0, 1, 2]  # a fresh start into the same store
    assert rs.steps().size == 0 and not any(w.all_done(c) for c in range(4))


def test_resume_extends_only_at_open_and_checks_the_layout(tmp_path):
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout([0, 5], max_steps=10))
    _commit_all(url, [(0, 0)])
    rs = RunStore(url)  # a live reader, open across the resume
    assert rs.steps().tolist() == [0]

    # resumed on 4 ranks with a longer schedule and run
    w = StoreWriter.create_or_open(url, u.layout([0, 5, 10, 15], world=4, max_steps=30))
    assert w.rollback_after(0) == []
    g = zarr.open_group(url, mode="r")
    assert g["acts/blocks.1.mlp.hook_post"].shape == (4, 4, 8, 200)
    assert g["captures/scheduled_step"][:].tolist() == [0, 5, 10, 15]
    assert g["captures/done"].shape == (4, 4) and g["metrics/val/loss"].shape == (30,)
    assert g.attrs["layout"]["world"] == 4 and g.attrs["layout"]["max_steps"] == 30
    _commit_all(url, [(1, 5), (3, 15)], world=4)
    assert rs.steps().tolist() == [0, 5, 15]  # the reader follows the extension
    for s in (0, 5, 15):
        u.check_capture(rs, s)
    w.write_metrics("val", np.array([25, 30]), {"loss": np.array([1.5, 1.25], np.float32)})
    assert rs.metrics("val")["step"].tolist() == []  # the reader's layout is from its open
    rs.refresh()
    assert rs.metrics("val")["step"].tolist() == [25, 30] and rs.world == 4

    # a shorter schedule (same prefix) keeps the store's
    StoreWriter.create_or_open(url, u.layout([0, 5], world=4))
    assert zarr.open_group(url, mode="r")["captures/step"].shape == (4,)
    bad = [
        (u.layout([0, 5], hooks={"blocks.0.hook_resid_post": 16}), "act_hooks"),
        (u.layout([0, 6]), "slot 1 is step 5 there, 6 now"),
        (u.layout([0, 5], source="train"), "source probe -> train"),
    ]
    for lay, msg in bad:
        with pytest.raises(StoreError, match=msg) as e:
            StoreWriter.create_or_open(url, lay)
        assert "\n" not in str(e.value)
    other = u.layout([0, 5])
    other.probe_tokens = other.probe_tokens + 1
    with pytest.raises(StoreError, match="another probe set"):
        StoreWriter.create_or_open(url, other)


def test_train_source_and_fsspec_urls(tmp_path):
    """file:// URLs (LocalStore under the hood) and a non-local fsspec URL (memory://,
    through zarr's FsspecStore and the writer's async chunk sink)."""
    for url in ("file://" + str(tmp_path / "f.zarr"), "memory://runs/m.zarr"):
        lay = u.layout([3, 6], source="train")
        StoreWriter.create_or_open(url, lay)
        _commit_all(url, [(0, 3), (1, 6)])
        rs = RunStore(url)
        assert rs.steps().tolist() == [3, 6] and rs.probe_tokens() is None
        u.check_capture(rs, 6)
        if url.startswith("file://"):
            assert (tmp_path / "f.zarr" / "zarr.json").exists()
            assert "probe" not in zarr.open_group(str(tmp_path / "f.zarr"), mode="r")


def test_layout_validation_and_sizes():
    lay = u.layout()
    per = (4 * 8 * 4  # inputs/tokens
           + sum(4 * 8 * d * 2 + 5 * d * 4 + d * 3 * 8 for d in u.HOOKS.values())
           + 2 * (2 * 2 * 8 * 8 * 2)  # attention, 2 layers
           + 8 + 8 + 2)  # step, scheduled_step, done
    assert lay.bytes_per_capture() == per
    assert lay.bytes_total() == 4 * per + 6 * 20 * 4 + 4 * 8 * 4
    for kw, msg in [(dict(steps=[5, 5]), "strictly increasing"),
                    (dict(hooks={"a/b": 4}), "cannot name a zarr node"),
                    (dict(source="x"), "source must be one of"),
                    (dict(world=0), "world must be at least 1")]:
        with pytest.raises(StoreError, match=msg):
            u.layout(**kw)
    with pytest.raises(StoreError, match="needs probe_tokens"):
        Layout([1], 4, 8, {"h": 4}, 2, [], 1, 0, 5, 1, "probe", {})
    with pytest.raises(StoreError, match="own names"):
        Layout([1], 4, 8, {"h": 4}, 2, [], 1, 0, 5, 1, "train", {"status": 1})


def test_corrupt_chunk_is_a_one_line_error(tmp_path):
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout(STEPS))
    _commit_all(url, [(0, 0)])
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
    StoreWriter.create_or_open(url, u.layout(STEPS))
    hook = "blocks.1.mlp.hook_post"
    old = zarr.open_array(url, path=f"acts/{hook}", mode="r")
    zarr.create_array(url, name=f"acts/{hook}", shape=old.shape, chunks=(1, 2, 8, 200),
                      dtype="float16", fill_value=np.nan, compressors=BloscCodec(),
                      overwrite=True)
    old = zarr.open_array(url, path=f"stats/{hook}/mean", mode="r")
    zarr.create_array(url, name=f"stats/{hook}/mean", shape=old.shape, chunks=old.chunks,
                      dtype="float32", fill_value=np.nan, compressors=BloscCodec(),
                      overwrite=True)
    _commit_all(url, [(1, 5)])
    u.check_capture(RunStore(url), 5)


def test_stat_of_one_neuron_a_slice_and_all(tmp_path):
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout(STEPS))
    _commit_all(url, [(0, 0), (2, 10)])
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

"""A store that is missing, newer or older than this code, or corrupt, bad writes, and
questions it cannot answer: each gives the right StoreError in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import store_util as u
from store import CorruptStore, SchemaVersionError, StoreError, StoreNotFound
from store.reader import RunStore
from store.writer import StoreWriter


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "capture.zarr")
    w0 = StoreWriter.create_or_open(url, u.layout())
    w1 = StoreWriter.open(url)
    u.append([w0, w1], 0, 0)
    u.append([w0, w1], 2, 10)  # slot 1 never committed: a hole readers skip
    return url


def test_missing_store(tmp_path):
    for url in (tmp_path / "nope.zarr", "file://" + str(tmp_path / "nope.zarr")):
        with pytest.raises(StoreNotFound) as e:
            RunStore(url)
        assert "no capture store at" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFound, match="no zarr.json") as e:
        RunStore(tmp_path / "empty")
    one_line(e)
    with pytest.raises(StoreNotFound):
        RunStore("memory://nothing/here.zarr")


def _edit_root(url: str, fn) -> None:
    path = f"{url}/zarr.json"
    meta = json.loads(open(path).read())
    fn(meta)
    open(path, "w").write(json.dumps(meta))


def test_newer_schema_is_refused_with_upgrade_advice(store):
    _edit_root(store, lambda m: m["attributes"].update(schema_version=3))
    for open_ in (RunStore, StoreWriter.open):
        with pytest.raises(SchemaVersionError) as e:
            open_(store)
        msg = one_line(e)
        assert "schema version 3, newer than this code reads (version 2)" in msg
        assert "upgrade this project" in msg
    with pytest.raises(SchemaVersionError):
        StoreWriter.create_or_open(store, u.layout())


def test_older_schema_is_refused_naming_the_converter(store):
    _edit_root(store, lambda m: m["attributes"].update(schema_version=1))
    for open_ in (RunStore, StoreWriter.open,
                  lambda url: StoreWriter.create_or_open(url, u.layout())):
        with pytest.raises(SchemaVersionError) as e:
            open_(store)
        assert one_line(e) == (f"store {store} has schema version 1, older than this code "
                               f"reads (version 2): convert it in place with `python -m "
                               f"store.upgrade {store}`")


def test_corrupt_root_metadata(store, tmp_path):
    root = f"{store}/zarr.json"
    original = open(root, "rb").read()
    open(root, "wb").write(b"\x00\x9f garbage \xff{{{")
    with pytest.raises(CorruptStore, match="zarr.json is not valid JSON") as e:
        RunStore(store)
    one_line(e)
    with pytest.raises(CorruptStore):  # the writer does not overwrite a broken store either
        StoreWriter.create_or_open(store, u.layout())
    open(root, "wb").write(original)
    _edit_root(store, lambda m: m["attributes"]["layout"].pop("n_seqs"))
    with pytest.raises(CorruptStore, match="layout attribute cannot be read") as e:
        RunStore(store)
    one_line(e)
    # some other zarr group: not a capture store
    other = str(tmp_path / "other.zarr")
    zarr.create_group(other, attributes={"hello": 1})
    with pytest.raises(CorruptStore, match="not a capture store") as e:
        RunStore(other)
    one_line(e)


def test_questions_the_store_cannot_answer(store):
    rs = RunStore(store)
    assert rs.steps().tolist() == [0, 10]
    with pytest.raises(StoreError) as e:
        rs.activations("blocks.0.hook_resid_post", 5)
    assert one_line(e) == ("step 5 is not captured; nearest captured steps: before 0, after 10 "
                           "(2 captured)")
    assert rs.nearest_steps(5) == (0, 10) and rs.nearest_steps(10) == (10, 10)
    assert rs.nearest_steps(11) == (10, None) and rs.nearest_steps(-1) == (None, 0)
    with pytest.raises(StoreError) as e:
        rs.activations("blocks.9.hook_nope", 0)
    assert one_line(e) == ("hook 'blocks.9.hook_nope' has no stored activations; stored: "
                           "blocks.0.hook_resid_post, blocks.1.mlp.hook_post")
    with pytest.raises(StoreError) as e:
        rs.stat("blocks.9.hook_nope", "mean")
    assert "stored hooks: blocks.0.hook_resid_post, blocks.1.mlp.hook_post" in one_line(e)
    with pytest.raises(StoreError, match="unknown statistic 'median'"):
        rs.stat("blocks.0.hook_resid_post", "median")
    with pytest.raises(StoreError, match="attention of layer 1 is not stored; stored layers: "
                                         "0, 2"):
        rs.attention(1, 0, 0)
    with pytest.raises(StoreError, match="attention sequence 2 is out of range 0..1"):
        rs.attention(0, 0, 2)
    with pytest.raises(StoreError, match="neuron 16 is out of range"):
        rs.topk("blocks.0.hook_resid_post", 0, 16)
    with pytest.raises(StoreError, match="no metrics split 'test'"):
        rs.metrics("test")
    # slices and whole columns
    np.testing.assert_array_equal(rs.activations("blocks.0.hook_resid_post", 10, slice(1, 3)),
                                  u.acts(10, "blocks.0.hook_resid_post", range(1, 3)))
    st, v = rs.stat("blocks.1.mlp.hook_post", "min")
    assert v.shape == (2, 200) and st.tolist() == [0, 10]
    assert rs.act_chunks("blocks.0.hook_resid_post") == (1, 1, u.T, 16)
    arrays = {a["path"]: a for a in rs.arrays()}
    acts = arrays["acts/blocks.1.mlp.hook_post"]
    assert acts["shape"] == (1024, 4, 8, 200) and acts["dtype"] == "float16"
    assert acts["bytes_stored"] >= 2 * 4 * 8 * 200 * 2 and acts["codecs"] == ["bytes"]
    assert acts["axes"][0].startswith("capture: ")


def test_writer_rejects_bad_writes(store):
    w = StoreWriter.open(store)
    with pytest.raises(StoreError, match=r"expected \[n, 8, 16\], got \[2, 8, 15\]"):
        w.write_acts("blocks.0.hook_resid_post", 1, 0, np.zeros((2, 8, 15), np.float16))
    with pytest.raises(StoreError, match="sequences 3..4 are out of range 0..3"):
        w.write_acts("blocks.0.hook_resid_post", 1, 3, np.zeros((2, 8, 16), np.float16))
    with pytest.raises(StoreError, match="expected exactly mean, std"):
        w.write_stats("blocks.0.hook_resid_post", 1, {"mean": np.zeros(16)})
    with pytest.raises(StoreError, match="metric steps must be >= 1, got 0"):
        w.write_metrics("train", np.array([0, 1]), {"loss": np.zeros(2)})
    with pytest.raises(StoreError, match="slot 1024 is out of range: the store has 1024 "
                                         "capture slots"):
        w.write_acts("blocks.0.hook_resid_post", 1024, 0, np.zeros((2, 8, 16), np.float16))
    with pytest.raises(StoreError, match="step must be >= 0"):
        w.commit(0, -1)
    for bad in (0, 2, 4 | 1):
        with pytest.raises(StoreError, match="tiers must be SUMMARY or SUMMARY | FULL"):
            w.commit(0, 0, bad)
    with pytest.raises(StoreError, match="keeps no per-token loss"):
        w.write_token_loss(0, np.zeros((4, 8)), 0.0)
    with pytest.raises(StoreError, match="metric train/acc is not in this store"):
        w.write_metrics("train", np.array([1]), {"acc": np.zeros(1)})
    with pytest.raises(StoreError, match="status must be one of"):
        w.set_status("paused")


def test_metrics_in_any_order(store):
    w = StoreWriter.open(store)
    w.write_metrics("val", np.array([7, 3, 7, 12]), {"loss": np.array([1, 2, 3, 4], np.float32),
                                                     "hellaswag_acc_norm": np.ones(4)})
    m = RunStore(store).metrics("val")
    assert m["step"].tolist() == [3, 7, 12]
    assert m["loss"].tolist() == [2, 3, 4] and m["hellaswag_acc_norm"].tolist() == [1, 1, 1]

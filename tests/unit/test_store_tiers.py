"""Capture tiers (summary-only and full captures), the per-token probe loss and the ICL
score, attention cut to attn_len positions, statistics of more hooks than the activations,
and metrics that grow past max_steps."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import store_util as u
from store.errors import StoreError
from store.reader import RunStore
from store.writer import StoreWriter

RESID, MLP = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"


def _store(tmp_path, caps, **kw) -> tuple[str, list]:
    url = str(tmp_path / "s.zarr")
    StoreWriter.create_or_open(url, u.layout(**kw))
    ws = [StoreWriter.open(url) for _ in range(2)]
    for slot, (step, full) in enumerate(caps):
        u.append(ws, slot, step, full=full)
    return url, ws


def test_summary_only_captures_keep_no_activations(tmp_path):
    caps = [(0, True), (3, False), (6, False), (9, True), (12, False)]
    url, ws = _store(tmp_path, caps)
    rs = RunStore(url)
    assert rs.steps().tolist() == [0, 3, 6, 9, 12]
    assert rs.steps("summary").tolist() == [0, 3, 6, 9, 12]
    assert rs.steps("full").tolist() == [0, 9]
    assert rs.tiers() == {0: ["summary", "full"], 3: ["summary"], 6: ["summary"],
                          9: ["summary", "full"], 12: ["summary"]}
    assert rs.nearest_steps(4, "full") == (0, 9) and rs.nearest_steps(4) == (3, 6)
    for step, full in caps:
        u.check_capture(rs, step, full)
    with pytest.raises(StoreError) as e:
        rs.activations(RESID, 3)
    assert str(e.value) == ("step 3 has a summary capture only; its activations and attention "
                            "are kept at full captures: nearest before 0, after 9")
    with pytest.raises(StoreError) as e:
        rs.attention(0, 12, 1)
    assert str(e.value).endswith("kept at full captures: nearest before 9")
    with pytest.raises(StoreError, match="step 4 is not captured; nearest captured steps: "
                                         "before 3, after 6"):
        rs.activations(RESID, 4)
    with pytest.raises(StoreError, match="unknown tier 'huge'; tiers: summary, full"):
        rs.steps("huge")
    # a summary-only capture writes no full-tier chunk at all
    acts = tmp_path / "s.zarr" / "acts" / RESID
    assert sorted({p.name.split(".")[1] for p in acts.glob("c.*")}) == ["0", "3"]
    assert not list((tmp_path / "s.zarr" / "attn" / "0").glob("c.1.*"))
    g = zarr.open_group(url, mode="r")
    assert g["captures/tier"][:6].tolist() == [3, 1, 1, 3, 1, 0]


def test_a_store_with_summary_captures_only(tmp_path):
    url, _ = _store(tmp_path, [(2, False), (4, False)])
    rs = RunStore(url)
    assert rs.steps().tolist() == [2, 4] and rs.steps("full").size == 0
    with pytest.raises(StoreError) as e:
        rs.activations(MLP, 2)
    assert str(e.value) == ("step 2 has a summary capture only; its activations and attention "
                            "are kept at full captures (none committed yet)")
    u.check_capture(rs, 4, full=False)


def test_token_loss_and_icl_round_trip(tmp_path):
    caps = [(0, True), (5, False), (10, True)]
    url, ws = _store(tmp_path, caps, token_loss=True)
    ws[0].reserve(3)
    for r, w in enumerate(ws):  # written and done, never committed: invisible
        u.write_part(w, 3, 15, r, 2)
    rs = RunStore(url)
    assert rs.has_token_loss
    for step, _ in caps:
        loss = rs.token_loss(step)
        assert loss.shape == (u.P, u.T) and loss.dtype == np.float32
        np.testing.assert_array_equal(loss, u.token_loss(step))  # NaN where it was NaN
        assert np.isnan(loss[:, 0]).all() and not np.isnan(loss[:, 1:]).any()
        np.testing.assert_array_equal(rs.token_loss(step, seq=2), u.token_loss(step)[2])
    steps, icl = rs.icl()
    assert steps.tolist() == [0, 5, 10] and icl.dtype == np.float32
    np.testing.assert_array_equal(icl, [u.icl(s) for s in (0, 5, 10)])
    with pytest.raises(StoreError, match="step 15 is not captured"):
        rs.token_loss(15)
    with pytest.raises(StoreError, match="sequence 4 is out of range 0..3"):
        rs.token_loss(5, seq=4)
    with pytest.raises(StoreError, match=r"write_token_loss: expected shape \[4, 8\]"):
        ws[0].write_token_loss(3, np.zeros((4, 7)), 0.0)
    g = zarr.open_group(url, mode="r")
    assert g["loss/token"].chunks == (1, u.P, u.T) and g["loss/icl"].shape == (1024,)


def test_a_store_without_token_loss_says_so(tmp_path):
    url, ws = _store(tmp_path, [(0, True)])
    rs = RunStore(url)
    assert not rs.has_token_loss
    with pytest.raises(StoreError, match="keeps no per-token loss"):
        rs.token_loss(0)
    with pytest.raises(StoreError, match="keeps no in-context-learning score"):
        rs.icl()
    with pytest.raises(StoreError, match="keeps no per-token loss"):
        ws[0].write_token_loss(0, u.token_loss(0), 0.0)
    assert "loss" not in zarr.open_group(url, mode="r")


def test_attention_keeps_the_first_attn_len_positions(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout(attn_len=5))
    assert zarr.open_array(url, path="attn/2", mode="r").shape == (1024, u.A, u.H, 5, 5)
    w.reserve(0)
    whole = u.attn(7, 2, 0)                     # [H, T, T]: the writer cuts it
    w.write_attn(2, 0, 0, whole)
    w.write_attn(2, 0, 1, u.attn(7, 2, 1, 5))   # [H, 5, 5]: as it is
    with pytest.raises(StoreError, match=r"expected shape \[2, 5, 5\], got \[2, 6, 6\]"):
        w.write_attn(2, 0, 0, u.attn(7, 2, 0, 6))
    w.mark_done(0, 0)
    w.mark_done(0, 1)
    w.commit(0, 7)
    rs = RunStore(url)
    assert rs.attn_len == 5
    np.testing.assert_array_equal(rs.attention(2, 7, 0), whole[:, :5, :5])
    np.testing.assert_array_equal(rs.attention(2, 7, 1, head=1), u.attn(7, 2, 1)[1, :5, :5])


def test_statistics_of_more_hooks_than_the_activations(tmp_path):
    url, ws = _store(tmp_path, [(0, True), (4, False)], hooks={RESID: 16}, stat_hooks=u.HOOKS)
    rs = RunStore(url)
    assert rs.hooks == u.HOOKS and rs.stat_hooks == u.HOOKS and rs.act_hooks == {RESID: 16}
    for step, full in ((0, True), (4, False)):
        u.check_capture(rs, step, full)  # stats and top-k of both, activations of one
    steps, v = rs.stat(MLP, "std", neuron=123)
    np.testing.assert_array_equal(v, [u.stats(s, MLP)["std"][123] for s in (0, 4)])
    with pytest.raises(StoreError) as e:
        rs.activations(MLP, 0)
    assert "has statistics only" in str(e.value) and f"stored: {RESID}" in str(e.value)
    with pytest.raises(StoreError, match="is not in this store"):
        ws[0].write_acts(MLP, 0, 0, u.acts(0, MLP, range(2)))
    url2, ws2 = _store(tmp_path / "b", [(0, True)], stat_hooks={RESID: 16})
    with pytest.raises(StoreError, match="has no statistics in this store"):
        ws2[0].write_stats(MLP, 0, u.stats(0, MLP))
    with pytest.raises(StoreError, match="is not stored; stored hooks"):
        RunStore(url2).stat("blocks.7.nope", "mean")


def test_metrics_grow_past_max_steps(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout(max_steps=20))
    rs = RunStore(url)
    w.write_metrics("train", np.arange(1, 21), {"loss": np.arange(1, 21, dtype=np.float32)})
    assert rs.metrics("train")["step"].tolist() == list(range(1, 21))  # opened at 20 steps
    w.write_metrics("train", np.array([4095, 4096, 4097, 9000]),
                    {"loss": np.array([1, 2, 3, 4], np.float32),
                     "lr": np.array([5, 6, 7, 8], np.float32)})
    g = zarr.open_group(url, mode="r")
    assert g["metrics/train/loss"].shape == (12288,) and g["metrics/train/lr"].shape == (12288,)
    assert g["metrics/val/loss"].shape == (20,)  # another split: as it was
    m = rs.metrics("train")  # the same reader, no refresh: it follows the growth
    assert m["step"].tolist() == list(range(1, 21)) + [4095, 4096, 4097, 9000]
    np.testing.assert_array_equal(m["loss"][:20], np.arange(1, 21))
    np.testing.assert_array_equal(m["loss"][20:], [1, 2, 3, 4])
    np.testing.assert_array_equal(m["lr"][20:], [5, 6, 7, 8])
    assert np.isnan(m["lr"][:20]).all()
    # a resume with the original max_steps keeps the longer arrays and their values
    StoreWriter.create_or_open(url, u.layout(max_steps=20))
    assert RunStore(url).metrics("train")["step"][-1] == 9000

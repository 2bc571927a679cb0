"""The repeated-token probe's attention (attn_repeated/<layer>): which positions it keeps,
the doc table's shape for it, the round trip through two ranks' writers (rank r % W writes
sequence r) and the commit, and stores without it: written before it existed (they read as
absent), or resumed by a run that keeps it (it is added; earlier full captures read NaN)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import store_util as u
from store.errors import StoreError
from store.reader import RunStore
from store.schema import FULL, SUMMARY, Layout, repeated_positions
from store.writer import StoreWriter

REP = u.DYNAMICS["repeated_tokens"]  # [2, 10]: 5 tokens, then the same 5
R, N = REP.shape


def layout(**kw) -> Layout:
    return u.layout(**{**u.DYNAMICS, "repeat_attn_seqs": 2, "repeat_attn_len": 6, **kw})


def pattern(step: int, layer: int, r: int) -> np.ndarray:
    """A whole [H, N, N] causal pattern, a function of (step, layer, r)."""
    v = (step + 3 * layer + 5 * r + np.arange(u.H)[:, None, None]
         + np.arange(N)[None, :, None] + np.arange(N)[None, None, :]) % 13
    return (np.tril(v) / 16).astype(np.float16)


def write(ws, slot: int, step: int, full: bool = True) -> None:
    """A capture by writers ws (rank i = ws[i]), the repeated patterns by rank r % W."""
    ws[0].reserve(slot)
    for rank, w in enumerate(ws):
        u.write_part(w, slot, step, rank, len(ws), done=False, full=full)
        for layer in w.layout.stored_attn_layers if full and w.layout.repeat_attn_seqs else []:
            for r in range(rank, w.layout.repeat_attn_seqs, len(ws)):
                w.write_repeated_attn(layer, slot, r, pattern(step, layer, r))
    ws[0].write_head_scores(slot, u.scores(step))
    ws[0].write_lens(slot, np.zeros(3, np.float32))
    if full:
        for layer in u.DYNAMICS["dla_layers"]:
            ws[0].write_dla(layer, slot, *u.effects(step, layer))
    for rank, w in enumerate(ws):
        w.mark_done(slot, rank)
    ws[0].commit(slot, step, SUMMARY | FULL if full else SUMMARY)


def test_positions_keep_both_halves_starts_and_every_kept_querys_stripe():
    assert repeated_positions(10, 10).tolist() == list(range(10))
    assert repeated_positions(10, 64).tolist() == list(range(10))
    assert repeated_positions(10, 6).tolist() == [0, 1, 2, 3, 5, 6]
    assert repeated_positions(16, 8).tolist() == [0, 1, 2, 3, 4, 8, 9, 10]
    assert repeated_positions(1024, 128).tolist() == [*range(65), *range(512, 575)]
    for n in (1, 2, 5, 8, 50):
        for kept in range(2, 2 * n + 1):
            pos = repeated_positions(2 * n, kept)
            assert len(pos) == kept and (np.diff(pos) > 0).all() and pos[-1] < 2 * n
            have = set(pos.tolist())
            second = [q for q in have if q >= n]
            assert second or kept < 3  # a second half as soon as there is room for one
            for q in second:  # its earlier occurrence and the token after it
                assert q - n in have and q - n + 1 in have


def test_the_doc_table_describes_it(tmp_path):
    lay = layout(token_loss=True, attn_len=5)
    url = tmp_path / "s.zarr"
    StoreWriter.create_or_open(str(url), lay)
    u.check_against_doc(url, lay)
    specs = {s.path: s for s in lay.array_specs(1)}
    assert specs["attn_repeated/0"].shape == (1, 2, u.H, 6, 6)
    assert specs["attn_repeated/2"].tier == "full" and "attn_repeated/1" not in specs
    assert lay.bytes_per_capture("full") - u.layout(**u.DYNAMICS, token_loss=True,
                                                    attn_len=5).bytes_per_capture("full") \
        == len(u.ATTN) * 2 * u.H * 6 * 6 * 2
    with pytest.raises(StoreError, match="repeat_attn_seqs 3"):
        layout(repeat_attn_seqs=3)  # more than R
    with pytest.raises(StoreError, match="repeat_attn_len 11"):
        layout(repeat_attn_len=11)  # more than N
    with pytest.raises(StoreError, match="need stored attention layers"):
        dataclasses.replace(layout(), attn_seqs=0)  # no natural attention, no repeated


def test_round_trip_through_two_ranks_and_the_commit(tmp_path):
    url = str(tmp_path / "s.zarr")
    w0 = StoreWriter.create_or_open(url, layout(), durable=False)
    w1 = StoreWriter.open(url, durable=False)
    write([w0, w1], 0, 0)
    write([w0, w1], 1, 5, full=False)
    # written but not committed: invisible
    w0.reserve(2)
    w1.write_repeated_attn(0, 2, 1, pattern(9, 0, 1))
    rs = RunStore(url)
    assert (rs.repeat_attn_seqs, rs.repeat_attn_len) == (2, 6)
    pos = rs.repeated_positions()
    assert pos.tolist() == [0, 1, 2, 3, 5, 6]
    np.testing.assert_array_equal(rs.repeated_tokens(), REP)
    for layer in u.ATTN:
        for r in range(2):
            got = rs.repeated_attention(layer, 0, r)
            assert got.dtype == np.float16 and got.shape == (u.H, 6, 6)
            np.testing.assert_array_equal(got, pattern(0, layer, r)[:, pos][:, :, pos])
    with pytest.raises(StoreError, match="summary capture only"):
        rs.repeated_attention(0, 5, 0)
    with pytest.raises(StoreError, match="not captured"):
        rs.repeated_attention(0, 9, 1)
    with pytest.raises(StoreError, match="repeated sequence 2 is out of range 0..1"):
        rs.repeated_attention(0, 0, 2)
    with pytest.raises(StoreError, match="layer 1 is not in this store"):
        rs.repeated_attention(1, 0, 0)
    # an already cut [H, Na, Na] is taken as it is; anything else is refused
    w0.write_repeated_attn(2, 2, 0, pattern(9, 2, 0)[:, pos][:, :, pos])
    with pytest.raises(StoreError, match=r"expected shape \[2, 6, 6\]"):
        w0.write_repeated_attn(2, 2, 0, pattern(9, 2, 0)[:, :6, :6].T)


def test_a_store_without_it_reads_as_absent_and_a_resume_adds_it(tmp_path):
    url = str(tmp_path / "old.zarr")
    old = u.layout(world=1, **u.DYNAMICS)  # as a run wrote it before this array existed
    w = StoreWriter.create_or_open(url, old, durable=False)
    write([w], 0, 0)
    # ... and its layout attribute as such a run wrote it: without the two keys
    zj = tmp_path / "old.zarr" / "zarr.json"
    meta = json.loads(zj.read_text())
    for k in ("repeat_attn_seqs", "repeat_attn_len"):
        meta["attributes"]["layout"].pop(k)
    zj.write_text(json.dumps(meta))
    rs = RunStore(url)
    assert rs.repeat_attn_seqs == 0 and rs.attn_layers == u.ATTN
    assert not any(a["path"].startswith("attn_repeated/") for a in rs.arrays(sizes=False))
    with pytest.raises(StoreError, match="attention of layer 0 is not in this store"):
        rs.repeated_attention(0, 0, 0)
    u.check_capture(rs, 0)  # everything else reads as before
    # a resumed run that keeps it: the arrays are added, the earlier capture reads NaN
    w = StoreWriter.create_or_open(url, layout(world=1), durable=False)
    write([w], 1, 4)
    rs = RunStore(url)
    assert rs.repeat_attn_seqs == 2
    assert np.isnan(rs.repeated_attention(0, 0, 1)).all()
    np.testing.assert_array_equal(rs.repeated_attention(0, 4, 1),
                                  pattern(4, 0, 1)[:, rs.repeated_positions()]
                                  [:, :, rs.repeated_positions()])
    # a resume that would change what it keeps is refused in one line
    with pytest.raises(StoreError, match=r"repeated-probe attention 2 x 6 -> 2 x 4"):
        StoreWriter.create_or_open(url, layout(world=1, repeat_attn_len=4))

"""The Neurons page's data (dashboard/neuron_data.py) on a small store written through
StoreWriter (tests/store_fixture.py): activations of one neuron from the full tier, their
histogram, examples from across the activation range, the logit effects, and the search."""

from __future__ import annotations

import numpy as np
import pytest

from store_fixture import ACT_HOOK, STAT_HOOK, write_store

FULL_STEPS = [0, 20, 40]


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    from store.reader import RunStore
    run = write_store(tmp_path_factory.mktemp("nd") / "run", [0, 10, 20, 30, 40], FULL_STEPS)
    return RunStore(run / "capture.zarr")


@pytest.fixture(scope="module")
def dec():
    from dashboard.data import make_decoder
    return make_decoder(None)


def test_hooks(rs):
    from dashboard import neuron_data as ND
    assert ND.mlp_layer("blocks.3.mlp.hook_post") == 3
    assert ND.mlp_layer("blocks.3.hook_resid_post") is None
    assert ND.mlp_layer("blocks.3.mlp.hook_pre") is None
    assert list(rs.hooks)[0] == ACT_HOOK and ND.default_hook(rs) == STAT_HOOK
    assert ND.dla_layer(rs, STAT_HOOK) == 0 and ND.dla_layer(rs, ACT_HOOK) is None
    assert ND.has_acts(rs, ACT_HOOK, 20) and not ND.has_acts(rs, ACT_HOOK, 30)
    assert not ND.has_acts(rs, STAT_HOOK, 20)


def test_neuron_acts_read_in_batches(rs, monkeypatch):
    from dashboard import neuron_data as ND
    want = rs.activations(ACT_HOOK, 20)[:, :, 2].astype(np.float32)
    np.testing.assert_array_equal(ND.neuron_acts(rs, ACT_HOOK, 20, 2), want)
    # one sequence at a time: the same column
    monkeypatch.setattr(ND, "READ_BYTES", 1)
    np.testing.assert_array_equal(ND.neuron_acts(rs, ACT_HOOK, 20, 2), want)
    assert ND.neuron_acts(rs, ACT_HOOK, 30, 2) is None  # a summary capture
    assert ND.neuron_acts(rs, STAT_HOOK, 20, 2) is None  # statistics only


def test_histogram_counts_every_token(rs):
    from dashboard import neuron_data as ND
    col = ND.neuron_acts(rs, ACT_HOOK, 40, 1)
    h = ND.histogram(col, bins=6)
    counts, edges = np.histogram(col.ravel(), bins=6)
    np.testing.assert_array_equal(h["counts"], counts)
    np.testing.assert_allclose(h["edges"], edges)
    assert h["n"] == col.size == rs.n_seqs * rs.seq_len == h["counts"].sum()
    col[0, :3] = np.nan  # never written: left out
    assert ND.histogram(col)["n"] == col.size - 3
    assert ND.histogram(np.full((2, 2), np.nan))["n"] == 0


def test_range_examples_fall_in_their_intervals(rs, dec):
    from dashboard import neuron_data as ND
    col = ND.neuron_acts(rs, ACT_HOOK, 20, 0)
    toks = ND.seq_tokens(rs, 20)
    bins = ND.range_examples(col, toks, dec, bins=3, per_bin=2, window=2)
    assert len(bins) == 3 and sum(b["count"] for b in bins) == col.size
    assert bins[0]["hi"] == pytest.approx(col.max()) and bins[-1]["lo"] == pytest.approx(col.min())
    assert [b["lo"] for b in bins] == sorted((b["lo"] for b in bins), reverse=True)
    for b in bins:
        assert len(b["rows"]) == min(2, b["count"])
        for r in b["rows"]:
            s, p = r["seq"], r["pos"]
            assert r["value"] == col[s, p] and b["lo"] <= r["value"] <= b["hi"]
            assert r["start"] == max(0, p - 2) and r["from_acts"]
            assert r["tokens"] == [f"#{t}" for t in toks[s, max(0, p - 2):p + 3]]
            np.testing.assert_array_equal(r["acts"], col[s, max(0, p - 2):p + 3])
    # the same draw on every call (a rerun shows the same examples)
    assert ND.range_examples(col, toks, dec, bins=3, per_bin=2, window=2) == bins
    assert ND.range_examples(np.full((1, 3), np.nan), toks, dec) == []


def test_example_context_is_what_the_sequence_has(dec):
    from dashboard import neuron_data as ND
    toks = np.arange(10)
    r = ND.example(toks, None, 0, 1, 5.0, dec, window=32)
    assert r["start"] == 0 and len(r["tokens"]) == 10 and not r["from_acts"]
    assert r["acts"][1] == 5.0 and np.isnan(r["acts"][0])
    r = ND.example(toks, np.arange(10.0), 0, 7, 7.0, dec, window=1)
    assert r["tokens"] == ["#6", "#7", "#8"] and r["acts"] == [6.0, 7.0, 8.0]


def test_top_tokens_from_a_column_read_no_activations(rs, dec, monkeypatch):
    from dashboard import neuron_data as ND
    from dashboard.data import top_tokens
    from store.reader import RunStore
    col = ND.neuron_acts(rs, ACT_HOOK, 20, 1)

    def boom(*a, **k):
        raise AssertionError("activations read again")

    monkeypatch.setattr(RunStore, "activations", boom)
    rows = top_tokens(rs, ACT_HOOK, 20, 1, dec, window=32, after=32, col=col)
    vals, seqs, poss = rs.topk(ACT_HOOK, 20, 1)
    assert [r["value"] for r in rows] == vals.tolist()
    for r, s in zip(rows, seqs):
        assert r["from_acts"] and r["start"] == 0 and len(r["tokens"]) == rs.seq_len
        np.testing.assert_array_equal(r["acts"], col[s])


def test_logit_effects(rs, dec):
    from dashboard import dynamics, neuron_data as ND
    assert dynamics.logit_effects is ND.logit_effects  # one function for both pages
    df = ND.logit_effects(rs, 0, 20, 3, dec)
    d = rs.neuron_logits(0, 20, 3)
    assert df["promotes"].tolist() == [repr(f"#{t}") for t in d["top_token"]]
    np.testing.assert_allclose(df["effect +"], np.round(d["top_value"], 4))
    assert df["suppresses"].tolist() == [repr(f"#{t}") for t in d["bottom_token"]]
    np.testing.assert_allclose(df["effect -"], np.round(d["bottom_value"], 4))


def test_search_by_top_example_and_promoted_token(rs, dec):
    from dashboard import neuron_data as ND
    # every neuron's top-k: (seq 1, pos 5) and (seq 0, pos 3) of the probe: ids 113, 103
    idx = ND.search_index(rs, STAT_HOOK, 20, dec)
    assert idx["dla_step"] == 20 and idx["top"].shape == (8, rs.k)
    res = ND.search(idx, "  #113 ")
    assert res.index.tolist() == list(range(8))
    assert res["in top examples"].tolist() == [1] * 8
    assert res["promotes (rank)"].tolist() == [0] * 8
    np.testing.assert_allclose(res["top activation"], 9.0)
    # promoted tokens at step 20 (slot 2): ids 2, 3
    res = ND.search(idx, "#3")
    assert res["promotes (rank)"].tolist() == [2] * 8 and res["in top examples"].sum() == 0
    assert len(ND.search(idx, "#999")) == 0 and len(ND.search(idx, " ")) == 0
    # a summary capture: the promoted tokens of the nearest full capture (40: slot 4)
    idx = ND.search_index(rs, STAT_HOOK, 30, dec)
    assert idx["dla_step"] == 40 and ND.search(idx, "#5")["promotes (rank)"].tolist() == [2] * 8
    # a hook without logit effects: the top examples only
    idx = ND.search_index(rs, ACT_HOOK, 20, dec)
    assert idx["promotes"] is None and ND.search(idx, "#103").index.tolist() == [0, 1, 2, 3]
    # the results are capped
    assert len(ND.search(ND.search_index(rs, STAT_HOOK, 20, dec), "#113", limit=3)) == 3


def test_window_and_picked_row():
    from dashboard import neuron_data as ND
    assert ND.window(100, 3072, 64) == (68, 132)
    assert ND.window(3, 3072, 64) == (0, 64) and ND.window(3070, 3072, 64) == (3008, 3072)
    assert ND.window(5, 32, 64) == (0, 32)
    # a row's position in the data given (whatever order it is shown in) -> its neuron
    assert ND.picked([40, 7, 12], [1]) == 7
    assert ND.picked([40, 7, 12], []) is None and ND.picked([40], [5]) is None

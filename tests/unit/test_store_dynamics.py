"""The store's training-dynamics arrays (head scores, logit lens, neuron logit effects):
written by rank 0, visible only once committed, read back exactly; and the read-side
rules on them: neuron births and deaths, the induction phase change."""

from __future__ import annotations

import numpy as np
import pytest

import store_util as u
from store_util import effects, scores, write_capture
from store.dynamics import neuron_events, phase_change
from store.errors import StoreError
from store.reader import RunStore
from store.schema import FULL, SUMMARY
from store.writer import StoreWriter

L, H, M, K = 3, u.H, 200, 4


def test_dynamics_round_trip_and_only_committed_captures_show(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout(**u.DYNAMICS))
    write_capture(w, 0, 0)
    write_capture(w, 1, 5)
    write_capture(w, 2, 10, commit=False)  # written, not committed: invisible
    rs = RunStore(url)
    assert rs.steps().tolist() == [0, 5]
    assert rs.head_score_names == u.DYNAMICS["head_scores"] and rs.has_lens
    assert (rs.dla_layers, rs.d_mlp, rs.dla_k) == ([0, 2], M, K)
    np.testing.assert_array_equal(rs.repeated_tokens(), u.DYNAMICS["repeated_tokens"])
    for name in rs.head_score_names:
        steps, s = rs.head_scores(name)
        assert steps.tolist() == [0, 5] and s.shape == (2, L, H)
        np.testing.assert_array_equal(s, np.stack([scores(0)[name], scores(5)[name]]))
    steps, lens = rs.logit_lens()
    np.testing.assert_array_equal(lens, [[3, 2, 1], [8, 7, 6]])
    d = rs.neuron_logits(2, 5, 17)
    tt, tv, bt, bv = effects(5, 2)
    np.testing.assert_array_equal(d["top_token"], tt[17])
    np.testing.assert_array_equal(d["top_value"], tv[17])
    np.testing.assert_array_equal(d["bottom_token"], bt[17])
    np.testing.assert_array_equal(d["bottom_value"], bv[17])
    with pytest.raises(StoreError, match="not captured|nearest"):
        rs.neuron_logits(2, 10, 17)
    with pytest.raises(StoreError, match="stored layers: 0, 2"):
        rs.neuron_logits(1, 5, 0)
    with pytest.raises(StoreError, match="out of range"):
        rs.neuron_logits(0, 5, M)
    # a summary-only capture: head scores and lens at every capture, logit effects not
    write_capture(w, 3, 7, full=False)
    steps, s = rs.head_scores("induction")
    assert steps.tolist() == [0, 5, 7]
    np.testing.assert_array_equal(s[2], scores(7)["induction"])
    np.testing.assert_array_equal(rs.logit_lens()[1][2], [10, 9, 8])
    with pytest.raises(StoreError) as e:
        rs.neuron_logits(2, 7, 17)
    assert str(e.value) == ("step 7 has a summary capture only; its activations and attention "
                            "are kept at full captures: nearest before 5")


def test_a_store_without_dynamics_says_so(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout())
    u.append([w, w], 0, 0)
    rs = RunStore(url)
    assert rs.head_score_names == [] and not rs.has_lens and rs.repeated_tokens() is None
    with pytest.raises(StoreError, match="not stored"):
        rs.head_scores("induction")
    with pytest.raises(StoreError, match="no logit lens"):
        rs.logit_lens()
    with pytest.raises(StoreError, match="no logit lens"):
        w.write_lens(0, np.zeros(3, np.float32))
    with pytest.raises(StoreError, match="expected exactly"):
        w.write_head_scores(0, {"induction": np.zeros((L, H), np.float32)})


def test_resume_must_keep_the_dynamics_settings(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout(**u.DYNAMICS))
    write_capture(w, 0, 0)
    with pytest.raises(StoreError, match="head_scores"):
        StoreWriter.create_or_open(url, u.layout())
    with pytest.raises(StoreError, match="dla_k 4 -> 5"):
        StoreWriter.create_or_open(url, u.layout(**dict(u.DYNAMICS, dla_k=5)))
    other = dict(u.DYNAMICS, repeated_tokens=u.DYNAMICS["repeated_tokens"] + 1)
    with pytest.raises(StoreError, match="repeated-token probe"):
        StoreWriter.create_or_open(url, u.layout(**other))
    w = StoreWriter.create_or_open(url, u.layout(**u.DYNAMICS))  # the same: it appends
    assert w.rollback_after(0) == [] and w.next_slot() == 1
    write_capture(w, 1, 9)
    assert RunStore(url).head_scores("entropy")[0].tolist() == [0, 9]


def test_bad_dynamics_layouts_are_refused():
    with pytest.raises(StoreError, match="head_scores must be"):
        u.layout(**dict(u.DYNAMICS, head_scores=["induction", "nonsense"]))
    with pytest.raises(StoreError, match="need repeated_tokens"):
        u.layout(**dict(u.DYNAMICS, repeated_tokens=None))
    with pytest.raises(StoreError, match="N even"):
        u.layout(**dict(u.DYNAMICS, repeated_tokens=np.zeros((2, 5), np.int32)))
    with pytest.raises(StoreError, match="d_mlp and dla_k"):
        u.layout(**dict(u.DYNAMICS, dla_k=0))


# ----------------------------------------------------------------------------- the rules

def test_neuron_births_and_deaths_with_hysteresis():
    steps = np.array([0, 10, 20, 30, 40, 50])
    f = np.array([
        # n0 dies at 20, flickers below 5% (no birth), is born again at 50
        [0.50, 0.20, 0.005, 0.03, 0.004, 0.30],
        # n1 dead from the start (counted dead at step 0, no event), born at 30
        [0.001, 0.002, 0.008, 0.40, 0.45, 0.50],
        # n2 always alive; a NaN (not captured) keeps its state
        [0.50, np.nan, 0.40, 0.45, 0.46, 0.50],
    ]).T
    ev = neuron_events(steps, f)
    assert ev.events == [(20, 0, "death"), (30, 1, "birth"), (50, 0, "birth")]
    assert ev.births.tolist() == [0, 0, 0, 1, 0, 1]
    assert ev.deaths.tolist() == [0, 0, 1, 0, 0, 0]
    assert ev.alive.tolist() == [[True, False, True], [True, False, True],
                                 [False, False, True], [False, True, True],
                                 [False, True, True], [True, True, True]]
    with pytest.raises(StoreError, match="dead_below"):
        neuron_events(steps, f, dead_below=0.2, alive_above=0.1)


def test_neuron_events_from_a_store(tmp_path):
    url = str(tmp_path / "s.zarr")
    w = StoreWriter.create_or_open(url, u.layout())
    hook = "blocks.1.mlp.hook_post"
    for slot, (step, frac) in enumerate(((0, 0.5), (5, 0.001), (10, 0.5))):
        for rank in range(2):
            u.write_part(w, slot, step, rank, 2, full=step != 5)
        s = u.stats(step, hook)
        s["frac_active"] = np.full(200, 0.5, np.float32)
        s["frac_active"][7] = frac  # neuron 7 dies at 5 and is born again at 10
        w.write_stats(hook, slot, s)
        w.commit(slot, step, SUMMARY if step == 5 else SUMMARY | FULL)
    ev = RunStore(url).neuron_events(hook)
    assert ev.events == [(5, 7, "death"), (10, 7, "birth")]


def test_phase_change_is_the_first_crossing():
    steps = np.array([0, 100, 200, 300, 400])
    s = np.zeros((5, 2, 3))
    s[:, 0, 1] = [0.6, 0.7, 0.8, 0.8, 0.8]     # above from the start: not a crossing
    s[:, 1, 2] = [0.02, 0.05, 0.3, 0.55, 0.9]  # crosses between 200 and 300
    s[:, 1, 0] = [0.01, 0.02, 0.04, 0.52, 0.6]  # crosses there too, lower: not chosen
    p = phase_change(steps, s)
    assert (p.step, p.before, p.layer, p.head) == (300, 200, 1, 2)
    assert p.score == pytest.approx(0.55)
    assert phase_change(steps, s, threshold=0.95) is None
    assert phase_change(steps, s, layers=[0]) is None
    s[1, 1, 2] = np.nan  # a head not scored at one capture crosses at the next valid pair
    assert phase_change(steps, s).step == 300

"""The Attention page on the repeated random-token sequences the induction score is measured
on, in Streamlit's AppTest on the store of a real tiny training run (conftest.py's tiny_run:
TINY_ARGS, a 16-token probe, so the repeated sequences are 8 random tokens twice, cut to 8
positions by capture.attn_len): the pattern shown is the store's and the model's own, the
stripe marked is where the induction score reads it, the hover names the query and key
tokens; a link addresses a repeated sequence (seq=r2) and old numeric links keep their
meaning; a store without the repeated probe's attention says so."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers import BPE
from apptest_env import arr, charts
from apptest_env import open_app as _open
from store.reader import RunStore

from store_fixture import write_store  # noqa: E402

pytestmark = pytest.mark.integration



def open_app(monkeypatch, run, **params):
    return _open(monkeypatch, run_dir=run, page="attention", **params)


def captions(at) -> str:
    return " ".join(c.value for c in at.caption)


@torch.no_grad()
def test_repeated_sequence_shows_the_stored_pattern_and_the_induction_stripe(
        monkeypatch, tiny_run):
    from dashboard.data import make_decoder
    from trainer.snapshots import load_model_at

    rs = RunStore(tiny_run / "capture.zarr")
    rep = rs.repeated_tokens()
    R, N = rep.shape
    n = N // 2
    assert (R, N) == (4, 16) and (rs.repeat_attn_seqs, rs.repeat_attn_len) == (4, 8)
    pos = rs.repeated_positions()
    assert pos.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]  # both halves' starts, stripe kept
    layer, head, r, step = 1, 1, 2, 8
    at = open_app(monkeypatch, tiny_run, layer=str(layer), head=str(head), seq=f"r{r}",
                  step=str(step))
    pick = at.selectbox(key="attn_seq")
    assert pick.value == f"r{r}" and pick.options == [
        "0", "1", "2", "3", *(f"repeated random tokens {i}" for i in range(R))]
    assert at.query_params["seq"] == [f"r{r}"] or at.query_params["seq"] == f"r{r}"
    c = charts(at)
    assert c[0]["layout"]["title"]["text"] == \
        f"Layer {layer}, head {head}, step {step}, repeated random tokens {r}"
    heat, stripe = c[0]["data"][0], c[0]["data"][1]
    # the pattern shown is the store's
    stored = rs.repeated_attention(layer, step, r).astype(np.float32)
    np.testing.assert_allclose(arr(heat["z"]), stored[head], atol=1e-6)
    # ... and the model's own at that step, at the kept positions
    model = load_model_at(tiny_run, step).model.eval()
    _, cache = model.run_with_cache(torch.from_numpy(rep).long(),
                                    names_filter=lambda x: x.endswith("hook_pattern"))
    full = cache[f"blocks.{layer}.attn.hook_pattern"].double().numpy()  # [R, H, N, N]
    np.testing.assert_allclose(stored, full[r][:, pos][:, :, pos], atol=2e-3)
    # hover: query and key tokens, whole, at their positions
    dec = make_decoder(str(BPE))
    text = [f"{p}:{dec(int(rep[r, p]))!r}" for p in pos]
    cd = heat["customdata"]
    assert [[tuple(x) for x in row] for row in cd] == [[(q, k) for k in text] for q in text]
    assert "customdata[0]" in heat["hovertemplate"] and "%{z" in heat["hovertemplate"]
    # the stripe marked: each kept second-half query q at key q - n + 1
    cells = {(int(y.split(":")[0]), int(x.split(":")[0]))
             for x, y in zip(stripe["x"], stripe["y"])}
    assert cells == {(q, q - n + 1) for q in pos if q >= n} == {(8, 1), (9, 2), (10, 3)}
    # ... which is where the induction score reads: that stripe's mean over every
    # second-half query of every repeated sequence is the stored score
    steps, score = rs.head_scores("induction")
    want = score[list(steps).index(step), layer, head]
    q = np.arange(n, N)
    np.testing.assert_allclose(full[:, head, q, q - n + 1].mean(), want, atol=2e-3)
    shown = stored[head][[list(pos).index(a) for a, _ in sorted(cells)],
                         [list(pos).index(b) for _, b in sorted(cells)]]
    np.testing.assert_allclose(shown, full[r, head, [8, 9, 10], [1, 2, 3]], atol=2e-3)
    cap = captions(at)
    assert "Orange squares: the induction stripe" in cap and \
        f"induction score at step {step}: {want:.3f}" in cap
    assert "0-4 of the first half and 8-10 of the second, 8 of 16" in cap


def test_numeric_links_still_name_probe_sequences(monkeypatch, tiny_run):
    rs = RunStore(tiny_run / "capture.zarr")
    at = open_app(monkeypatch, tiny_run, layer="1", head="0", seq="2", step="4")
    assert at.selectbox(key="attn_seq").value == 2
    c = charts(at)
    assert c[0]["layout"]["title"]["text"] == "Layer 1, head 0, step 4, sequence 2"
    np.testing.assert_allclose(arr(c[0]["data"][0]["z"]),
                               rs.attention(1, 4, 2, 0).astype(np.float32), atol=1e-6)
    assert len(c[0]["data"]) == 1  # no stripe on natural text
    cd = c[0]["data"][0]["customdata"]
    labels = c[0]["data"][0]["x"]
    assert cd[5][2][0].startswith("5:") and cd[5][2][1].startswith("2:")
    assert cd[5][2][0][:18] == labels[5] and cd[5][2][1][:18] == labels[2]
    # picking a repeated sequence writes it into the URL
    at.selectbox(key="attn_seq").set_value("r1").run()
    assert not at.exception
    assert "repeated random tokens 1" in charts(at)[0]["layout"]["title"]["text"]
    assert at.query_params["seq"] in ("r1", ["r1"])


def test_a_store_without_the_repeated_probes_attention_says_so(monkeypatch, tmp_path):
    """Stores written before the repeated probe's attention was kept (store_fixture writes
    no attn_repeated) show everything else; a link to r0 opens probe sequence 0."""
    run = write_store(tmp_path / "old", [0, 10], full=[0, 10])
    rs = RunStore(run / "capture.zarr")
    assert rs.repeat_attn_seqs == 0 and rs.head_score_names[-1] == "induction"
    at = open_app(monkeypatch, run, layer="1", head="0", seq="r0", step="10")
    assert at.selectbox(key="attn_seq").options == ["0"]
    assert at.selectbox(key="attn_seq").value == 0 and not at.error
    assert "are not in this store" in captions(at)
    assert charts(at)[0]["layout"]["title"]["text"] == "Layer 1, head 0, step 10, sequence 0"

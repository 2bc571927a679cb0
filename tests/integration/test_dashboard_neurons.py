"""The Neurons page on the store of a real tiny training run (tiny_run: summary captures at 0,
1, 2, 4, 6, 8, full ones at 0, 1, 2, 4, 8; blocks.1.mlp.hook_post keeps activations,
blocks.0.mlp.hook_post statistics only): every view shows the store's own numbers, in
Streamlit's AppTest; and in a headless Chromium, clicking a row of the neuron table opens
that neuron."""

from __future__ import annotations

import html as H
import json
import re
import time

import numpy as np
import pytest

from browser_env import chromium, serve_dashboard
from helpers import BPE
from apptest_env import arr, open_app
from store.reader import RunStore

pytestmark = pytest.mark.integration

MLP = "blocks.1.mlp.hook_post"  # an MLP hook whose activations full captures keep


@pytest.fixture(scope="module")
def rs(tiny_run) -> RunStore:
    r = RunStore(tiny_run / "capture.zarr")
    assert MLP in r.act_hooks and 8 in r.steps("full") and 6 not in r.steps("full")
    return r


@pytest.fixture(scope="module")
def decode():
    from dashboard.data import make_decoder
    return make_decoder(str(BPE))


def opened(monkeypatch, run, **params):
    """The app on `run`, opened at a link's query parameters: no exception, no error."""
    at = open_app(monkeypatch, run_dir=run, page="neurons", **params)
    assert not at.error, [e.value for e in at.error]
    return at


def chart(at, title: str) -> dict:
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        if (spec["layout"].get("title") or {}).get("text", "").startswith(title):
            return spec
    raise AssertionError(f"no chart titled {title!r}")


def captions(at) -> str:
    return " ".join(c.value for c in at.caption)


def table(at, column: str):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def rows_of(markup: str) -> list[dict]:
    """The examples drawn by neurons.tokens_html: value, seq, pos, token texts and titles."""
    out = []
    for part in markup.split("<div class='toprow'>")[1:]:
        m = re.match(r"<b>(-?[\d.]+)</b> &nbsp; seq (\d+), pos (\d+):", part)
        spans = re.findall(r"<span class='tok' title='([^']*)' style='([^']*)'>(.*?)</span>",
                           part)
        out.append({"value": float(m[1]), "seq": int(m[2]), "pos": int(m[3]),
                    "titles": [t for t, _, _ in spans], "boxed": [("border" in s) for _, s, _
                                                                  in spans],
                    "texts": [H.unescape(x.replace("&nbsp;", " ")).replace("⏎", "\n")
                              for _, _, x in spans]})
    return out


def test_neuron_views_show_the_stores_numbers(monkeypatch, tiny_run, rs, decode):
    from dashboard import neuron_data as ND
    # the page opens on the first MLP hook (statistics only here), at the last step
    at = opened(monkeypatch, tiny_run)
    assert at.selectbox(key="hook").value == "blocks.0.mlp.hook_post" == ND.default_hook(rs)
    assert "blocks.0.mlp.hook_post keeps statistics and top-k only" in captions(at)

    at = opened(monkeypatch, tiny_run, hook=MLP, neuron="70", step="8")
    assert at.number_input(key="neuron").value == 70
    assert [h.value for h in at.subheader][0] == f"Neuron 70 of {MLP} at step 8"
    col = rs.activations(MLP, 8)[:, :, 70].astype(np.float32)
    probe = rs.probe_tokens()
    # its statistics, as stored
    stats = rs.stats_at(MLP, 8, 70)
    assert {m.label: m.value for m in at.metric} == {k: f"{float(v):.4g}"
                                                     for k, v in stats.items()}
    # the histogram: every token's activation from the full capture
    bars = chart(at, "Activations of neuron 70 at step 8")["data"][0]
    counts, edges = np.histogram(col, bins=ND.HIST_BINS)
    assert arr(bars["y"]).tolist() == counts.tolist() and counts.sum() == col.size
    np.testing.assert_allclose(arr(bars["x"]), (edges[:-1] + edges[1:]) / 2, rtol=1e-5)
    assert f"From the stored activations of all {col.size} tokens" in captions(at)
    # the top examples: the stored top-k, each with its whole 16-token sequence as context
    md = [m.value for m in at.markdown if "toprow" in m.value]
    top, ranges = rows_of(md[0]), md[1]
    vals, seqs, poss = rs.topk(MLP, 8, 70)
    assert [(r["seq"], r["pos"]) for r in top] == list(zip(seqs.tolist(), poss.tolist()))
    assert [r["value"] for r in top] == [float(f"{v:.3f}") for v in vals]
    for r in top:
        assert r["texts"] == [decode(t) for t in probe[r["seq"]]]
        assert r["titles"] == [f"{a:.3f}" for a in col[r["seq"]]]
        assert r["boxed"].index(True) == r["pos"]
    assert vals[0] == pytest.approx(np.nanmax(col), rel=2e-3)  # acts are float16
    # examples across the range: each in its interval, coloured from the activations
    bins = re.findall(r"<div class='rangebin' data-lo='([^']*)' data-hi='([^']*)'>"
                      r"<i>[^<]*: (\d+) tokens</i>(.*?)(?=<div class='rangebin'|$)", ranges,
                      re.S)
    assert len(bins) == ND.RANGE_BINS and sum(int(b[2]) for b in bins) == col.size
    assert float(bins[0][1]) == pytest.approx(col.max(), rel=1e-4)
    assert float(bins[-1][0]) == pytest.approx(col.min(), rel=1e-4)
    for lo, hi, count, body in bins:
        ex = rows_of(body)
        assert len(ex) == min(ND.RANGE_PER_BIN, int(count))
        for r in ex:
            a = col[r["seq"], r["pos"]]
            assert float(lo) - 1e-4 <= a <= float(hi) + 1e-4 and r["value"] == float(f"{a:.3f}")
            assert r["titles"][r["pos"]] == f"{a:.3f}"
    # its promoted and suppressed tokens: the store's logit effects of layer 1, neuron 70
    fx = table(at, "promotes")
    d = rs.neuron_logits(1, 8, 70)
    assert fx["promotes"].tolist() == [repr(decode(t)) for t in d["top_token"]]
    np.testing.assert_allclose(fx["effect +"], np.round(d["top_value"], 4))
    assert fx["suppresses"].tolist() == [repr(decode(t)) for t in d["bottom_token"]]
    # the heatmap: 64 neurons around neuron 70, as stored
    lo, hi = ND.window(70, rs.hooks[MLP], 64)
    heat = chart(at, f"mean of neurons {lo}-{hi - 1} by step")["data"][0]
    _, block = rs.stat(MLP, "mean", slice(lo, hi))
    np.testing.assert_allclose(arr(heat["z"]), block.T, rtol=1e-6)
    assert lo <= 70 < hi and (lo, hi) != (0, 64)

    # a summary capture: the statistics, said to be only those
    at.select_slider(key="neuron_step").set_value(6).run()
    assert not at.exception
    st6 = rs.stats_at(MLP, 6, 70)
    s = chart(at, "Statistics of neuron 70 at step 6")["data"]
    assert arr(s[0]["x"]).tolist() == pytest.approx([float(st6["min"]), float(st6["max"])])
    assert arr(s[1]["x"])[0] == pytest.approx(float(st6["mean"]))
    assert arr(s[2]["x"]).tolist() == pytest.approx(rs.topk(MLP, 6, 70)[0].tolist())
    assert ("No histogram: step 6 is a summary capture; activations are kept at full "
            "captures (nearest: step 8)") in captions(at)
    assert "These need the activations: step 6 is a summary capture" in captions(at)
    assert "from the weights at step 8 (a summary capture" in captions(at)
    # one click opens the nearest full capture, with its histogram
    at.button(key="neuron_go_full").click().run()
    assert at.select_slider(key="neuron_step").value == 8
    assert chart(at, "Activations of neuron 70 at step 8")


def test_search_finds_neurons_by_token(monkeypatch, tiny_run, rs, decode):
    probe = rs.probe_tokens()
    vals, seqs, poss = rs.topk(MLP, 8, 70)
    word = decode(probe[seqs[0], poss[0]])
    at = opened(monkeypatch, tiny_run, hook=MLP, neuron="3", step="8", q=word)
    assert at.text_input(key="neuron_q").value == word
    res = table(at, "in top examples")
    # every neuron, by brute force over the store's top-k and logit effects
    want = {}
    for n in range(rs.hooks[MLP]):
        _, s, p = rs.topk(MLP, 8, n)
        k = sum(decode(t).strip().lower() == word.strip().lower() for t in probe[s, p])
        top = [decode(t).strip().lower() for t in rs.neuron_logits(1, 8, n)["top_token"]]
        rank = top.index(word.strip().lower()) + 1 if word.strip().lower() in top else 0
        if k or rank:
            want[n] = (k, rank)
    assert 70 in want
    assert {int(n): (int(r["in top examples"]), int(r["promotes (rank)"]))
            for n, r in res.iterrows()} == want
    assert res["in top examples"].tolist() == sorted(res["in top examples"], reverse=True)
    assert f"with {word.strip()!r} among their top {rs.k} tokens at step 8" in captions(at)
    assert at.query_params["q"] == word
    at.text_input(key="neuron_q").set_value("no such token here").run()
    assert "No neuron of blocks.1.mlp.hook_post has 'no such token here'" in captions(at)


# ----------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    with serve_dashboard(["--run-dir", str(tiny_run)], tmp_path_factory.mktemp("streamlit")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as drv:
        yield drv


def test_clicking_a_table_row_opens_that_neuron(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def heading(d) -> str:
        hs = [e.text for e in d.find_elements(By.CSS_SELECTOR, "h3")
              if e.text.startswith("Neuron ") and " of " in e.text]
        busy = d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")
        return "" if busy or not hs else hs[0]

    wait = WebDriverWait(browser, 60, poll_frequency=0.3)
    browser.get(f"{server}/?page=neurons&hook={MLP}&neuron=5&step=8")
    wait.until(lambda d: heading(d).startswith(f"Neuron 5 of {MLP}"))
    # the first table on the page is the neuron table (the search's appears with a query)
    grid = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, "[data-testid='stDataFrame']")
                                 or [None])[0])
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", grid)
    time.sleep(0.5)
    # the third data row (neuron 2): below the 35-pixel header, rows 35 pixels high,
    # clicked in its selection column at the left
    box = grid.rect
    ActionChains(browser).move_to_element_with_offset(
        grid, -box["width"] / 2 + 15, -box["height"] / 2 + 35 + 2 * 35 + 17).click().perform()
    wait.until(lambda d: heading(d).startswith(f"Neuron 2 of {MLP}"))
    inp = browser.find_element(By.CSS_SELECTOR, "[data-testid='stNumberInput'] input")
    assert inp.get_attribute("value") == "2"
    assert "neuron=2" in browser.current_url

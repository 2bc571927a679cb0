"""The Prompt page served by `streamlit run` and driven in a real headless Chromium (selenium
with Debian's chromium and chromedriver), on the session's tiny_run: a text typed in, a
neuron chosen, the across-training heatmaps drawn with the text's tokens and one column per
weight snapshot, and hovering a token in the attention view shows where it attends and
what attends to it. The screenshot goes to the test's temporary folder only
(docs/screenshots/prompt.png is copied from there by hand)."""

from __future__ import annotations

import subprocess
import time

import pytest

from browser_env import chromium, serve_dashboard
from helpers import ROOT, TINY_SNAPSHOTS

pytestmark = pytest.mark.integration

TEXT = "JULIET: O Romeo, Romeo, wherefore art thou Romeo?"
HOOK = "blocks.0.mlp.hook_post"  # the page's default: the first captured MLP hook
NEURON = 7


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`streamlit run dashboard/app.py -- --run-dir tiny_run` (as test_dashboard_browser.py
    starts it)."""
    log_dir = tmp_path_factory.mktemp("streamlit_prompt")
    with serve_dashboard(["--run-dir", str(tiny_run)], log_dir) as url:
        yield url, log_dir / "server.log"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile-prompt")) as drv:
        yield drv


def _wait(drv, pred, timeout: float = 90, what: str = ""):
    """Until pred(drv) holds and Streamlit is no longer running the script."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        if d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']"):
            return False
        return pred(d)

    try:
        WebDriverWait(drv, timeout, poll_frequency=0.3).until(ready)
    except Exception as e:  # noqa: BLE001 - say what was awaited, with the page's text
        body = drv.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; the page shows:\n"
                             f"{body[-2000:]}") from e


def _plots(drv) -> dict[str, dict]:
    """Each drawn plotly chart by its title: its first trace's x, y and z sizes (from the
    graph div plotly.js drew)."""
    return drv.execute_script("""
        const out = {};
        for (const gd of document.querySelectorAll('.js-plotly-plot')) {
          const t = gd.layout && gd.layout.title && gd.layout.title.text &&
                    gd.layout.title.text.replace(/<[^>]*>/g, '');  // Streamlit bolds it
          const d = gd.data && gd.data[0];
          if (!t || !d) continue;
          const cd = gd.calcdata && gd.calcdata[0] && gd.calcdata[0][0];
          const z = (cd && cd.z) || [];  // the heatmap's z as plotly.js drew it
          out[t] = {x: Array.from(d.x || []).map(String), y: Array.from(d.y || []).map(String),
                    rows: z.length, cols: z[0] ? z[0].length : 0,
                    drawn: gd.querySelectorAll('.heatmaplayer image, .hm image').length,
                    frames: (gd._transitionData && gd._transitionData._frames || []).length};
        }
        return out;""")


def _repo_files() -> str:
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                        "docs/screenshots"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def test_prompt_page_in_a_browser(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, log = server
    before = _repo_files()
    drv = browser
    drv.get(f"{url}/?page=prompt")
    _wait(drv, lambda d: "Per-token loss by step" in _plots(d), what="the first draw")

    # type a text (Ctrl+Enter applies it)
    box = drv.find_element(By.CSS_SELECTOR, "[data-testid='stTextArea'] textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(TEXT)
    box.send_keys(Keys.CONTROL, Keys.ENTER)
    _wait(drv, lambda d: _plots(d).get("Per-token loss by step", {}).get("y", [""])[0]
          == "1:'UL'", what="the typed text's loss heatmap")  # J|UL|I|ET

    # choose a neuron
    num = drv.find_element(By.CSS_SELECTOR, "[data-testid='stNumberInput'] input")
    num.send_keys(Keys.CONTROL, "a")
    num.send_keys(str(NEURON), Keys.ENTER)
    title = f"Neuron {NEURON} of {HOOK} on this text by step"
    _wait(drv, lambda d: title in _plots(d), what=title)
    time.sleep(1.0)  # plotly's layout settles before the checks and the screenshot

    plots = _plots(drv)
    xs = [str(s) for s in TINY_SNAPSHOTS]
    loss, neuron = plots["Per-token loss by step"], plots[title]
    n_tok = len(neuron["y"])
    assert loss["x"] == xs and neuron["x"] == xs  # one column per weight snapshot
    assert (loss["rows"], loss["cols"]) == (n_tok - 1, len(xs))
    assert (neuron["rows"], neuron["cols"]) == (n_tok, len(xs))
    assert loss["drawn"] >= 1 and neuron["drawn"] >= 1  # the heatmap images are drawn
    assert neuron["y"][0].startswith("0:'J")
    anim = plots["Layer 0, head 0 by step (slide the step)"]
    assert anim["frames"] == len(xs)
    body = drv.find_element(By.TAG_NAME, "body").text
    assert f"Neuron {NEURON} of {HOOK}" in body and f"{n_tok} tokens of at most 32" in body
    assert "Traceback" not in body
    # the token spans: coloured by loss, with the top-5 next tokens on hover
    spans = drv.find_elements(By.CSS_SELECTOR, "span.ptok")
    assert len(spans) == n_tok and "next: " in spans[1].get_attribute("title")
    assert len(drv.find_elements(By.CSS_SELECTOR, "span.tok")) == n_tok

    # hovering a token in the attention view: where it attends, what attends to it
    drv.switch_to.frame(drv.find_element(By.CSS_SELECTOR, "iframe"))
    try:
        q = drv.find_elements(By.CSS_SELECTOR, "#q .atok")
        assert len(q) == n_tok
        assert drv.find_element(By.ID, "av").get_attribute("data-shown") == str(n_tok - 1)
        ActionChains(drv).move_to_element(q[2]).perform()
        _wait(drv, lambda d: d.find_element(By.ID, "av").get_attribute("data-shown") == "2",
              timeout=10, what="the hover")
        assert "token 2" in drv.find_element(By.ID, "info").text
        k = drv.find_elements(By.CSS_SELECTOR, "#k .atok")
        # query 2 attends to keys 0..2 only; keys 2.. are attended to by later queries
        assert all("0.000" in s.get_attribute("title") for s in q[3:])
        assert "query 2 -> key 2" in k[2].get_attribute("title")
    finally:
        drv.switch_to.default_content()

    out = tmp_path / "prompt.png"
    assert drv.save_screenshot(str(out)) and out.stat().st_size > 10_000
    assert _repo_files() == before, "the test changed files under docs/screenshots/"
    assert "Traceback" not in log.read_text()

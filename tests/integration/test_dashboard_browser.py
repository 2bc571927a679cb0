"""The dashboard served by `streamlit run` and rendered by a real headless Chromium (selenium
with Debian's chromium and chromedriver): each page draws its charts with the store's
values; a screenshot of each goes to the test's temporary folder only (the repository stays
as it was: docs/screenshots/ is refreshed by hand, by copying them from there)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from browser_env import chromium, serve_dashboard
from helpers import ROOT
from store.reader import RunStore

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    with serve_dashboard(["--run-dir", str(tiny_run)], tmp_path_factory.mktemp("streamlit")) as url:
        yield url, RunStore(tiny_run / "capture.zarr")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as drv:
        yield drv


def _load(drv, url: str, page: str, css: str, text: str, n: int = 1, timeout: float = 60):
    """Load ?page=<page> and wait until `n` elements match `css` and the body shows `text`
    and Streamlit is no longer running the script."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get(f"{url}/?page={page}")

    def ready(d):
        if len(d.find_elements(By.CSS_SELECTOR, css)) < n:
            return False
        if text not in d.find_element(By.TAG_NAME, "body").text:
            return False
        return not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")

    WebDriverWait(drv, timeout, poll_frequency=0.3).until(ready)
    time.sleep(0.8)  # let plotly finish its layout before the screenshot
    return drv.find_element(By.TAG_NAME, "body").text


def _plot_titles(drv) -> list[str]:
    from selenium.webdriver.common.by import By
    return [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .gtitle")]


def _shot(drv, name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.png"
    assert drv.save_screenshot(str(out))
    assert out.stat().st_size > 10_000


def _repo_files() -> str:
    """`git status` of docs/screenshots/ (their old home): the test must leave it as it
    was."""
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                        "docs/screenshots"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def test_pages_render(server, browser, tmp_path):
    url, rs = server
    before = _repo_files()
    tr, va = rs.metrics("train"), rs.metrics("val")
    steps = [int(s) for s in rs.steps()]
    full = [int(s) for s in rs.steps("full")]
    assert 6 in steps and 6 not in full  # a summary-only capture

    body = _load(browser, url, "training", ".js-plotly-plot", "Train loss", n=4)
    assert f"{tr['loss'][-1]:.4f}" in body and f"{va['loss'][-1]:.4f}" in body
    captures = (f"{len(steps)} ({len(full)} full) · {len(rs.snapshot_steps())} snapshots")
    assert "finished" in body and \
        f"{len(full)} full · {len(rs.snapshot_steps())} snapshots" in body
    assert "captures " + captures in body  # the sidebar's run summary too
    assert _plot_titles(browser) == ["Loss", "Validation loss", "Learning rate",
                                     "Gradient norm", "Tokens per second"]
    _shot(browser, "training", tmp_path)

    body = _load(browser, url, "neurons", ".js-plotly-plot", "Top-activating tokens", n=4)
    hook = next(iter(rs.hooks))
    assert "Top-activating tokens of neuron" in body and f"at step {steps[-1]}" in body
    t = _plot_titles(browser)
    assert f"mean of the {rs.hooks[hook]} neurons of {hook} at step {steps[-1]}" in t
    from selenium.webdriver.common.by import By
    assert len(browser.find_elements(By.CSS_SELECTOR, "span.tok")) > 0
    _shot(browser, "neurons", tmp_path)

    body = _load(browser, url, "attention", ".js-plotly-plot", "Probe sequence", n=2)
    assert _plot_titles(browser) == [f"Layer 0, head 0, step {full[-1]}, sequence 0",
                                     f"All {rs.n_heads} heads of layer 0 at step {full[-1]}"]
    assert "Step (full captures)" in body
    assert f"The first {rs.attn_len} of {rs.seq_len} query and key positions" in body
    _shot(browser, "attention", tmp_path)

    body = _load(browser, url, "dynamics", ".js-plotly-plot", "Neuron logit effects", n=5)
    t = _plot_titles(browser)
    assert t[:2] == ["induction of every head by step", "Highest induction in each layer"]
    assert "In-context-learning score by step" in t
    assert "No induction phase change yet" in body
    _shot(browser, "dynamics", tmp_path)

    body = _load(browser, url, "store", "[data-testid='stDataFrame']", "schema version 2", n=2)
    assert f"{len(rs.arrays(sizes=False))} arrays" in body and "Captures and snapshots" in body
    _shot(browser, "store", tmp_path)

    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "attention.png", "dynamics.png", "neurons.png", "store.png", "training.png"]
    assert _repo_files() == before, "the test changed files under docs/screenshots/"

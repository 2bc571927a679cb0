"""Runs compared, served by `streamlit run` and drawn by a real headless Chromium 1000 px
wide (selenium with Debian's chromium and chromedriver): the Training page draws two curves
per metric for two runs, and its headline numbers are not cut off."""

from __future__ import annotations

import time

import pytest

from browser_env import chromium, serve_dashboard
from store.reader import RunStore

pytestmark = pytest.mark.integration

TITLES = ["Loss", "Validation loss", "Learning rate", "Gradient norm", "Tokens per second"]


@pytest.fixture
def server(run_pair, tmp_path):
    with serve_dashboard(["--runs-root", str(run_pair["a"].parent)], tmp_path) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chromium-profile", 1000, 1000) as drv:
        yield drv


def test_two_runs_draw_two_curves_per_metric(server, browser, run_pair):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/?page=training&run=a&compare=b")

    def ready(d):
        return (len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= len(TITLES)
                and "Train loss" in d.find_element(By.TAG_NAME, "body").text
                and not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']"))

    WebDriverWait(browser, 60, poll_frequency=0.3).until(ready)
    time.sleep(0.8)  # plotly lays out after the elements exist
    drawn = dict(browser.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].map(p => "
        "[p.querySelector('.gtitle')?.textContent, "
        "p.querySelectorAll('.scatterlayer .trace').length])"))
    rs = RunStore(run_pair["a"] / "capture.zarr")
    markers = 1 + (len(rs.steps()) > len(rs.steps("full")))  # full, summary-only captures
    assert drawn == {t: 2 + (markers if t == "Loss" else 0) for t in TITLES}
    # every headline number whole: no element of a metric narrower than its text
    cut = browser.execute_script(
        "return [...document.querySelectorAll('[data-testid=\"stMetric\"]')].flatMap(m => "
        "[m, ...m.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1)"
        ".map(e => m.innerText))")
    labels = browser.execute_script(
        "return [...document.querySelectorAll('[data-testid=\"stMetricLabel\"]')]"
        ".map(e => e.innerText)")
    assert labels == ["Step", "Train loss", "Val loss", "Captures", "Status"]
    assert cut == []

"""Runs compared, served by `streamlit run` and drawn by a real headless Chromium 1000 px
wide (selenium with Debian's chromium and chromedriver): the Training page draws two curves
per metric for two runs, and its headline numbers are not cut off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, env
from store.reader import RunStore

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TITLES = ["Loss", "Validation loss", "Learning rate", "Gradient norm", "Tokens per second"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(run_pair, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    p = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
         "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--", "--runs-root", str(run_pair["a"].parent)],
        cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        if p.poll() is not None:
            log.seek(0)
            pytest.fail(f"streamlit exited early:\n{log.read()[-3000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install Debian's browser with "
                    f"`apt-get install -y chromium chromium-driver`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium (the `test` extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1000,1000",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


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

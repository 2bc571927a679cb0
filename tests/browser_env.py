"""The dashboard's browser tests' two real parts: `streamlit run dashboard/app.py` on a free
loopback port, and Debian's headless Chromium driven by selenium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ROOT, env

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_dashboard(app_args: list[str], log_dir: Path, **extra_env) -> Iterator[str]:
    """The dashboard served with `app_args` (what follows `--`, e.g. ["--run-dir", RUN]);
    yields its URL once the port answers, and stops the server after. Its output goes to
    log_dir/server.log, shown when it exits early."""
    port = free_port()
    log = open(log_dir / "server.log", "w+")
    p = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
         "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--", *app_args],
        cwd=ROOT, env=env(**extra_env), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
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


@contextmanager
def chromium(profile_dir: Path, width: int = 1400, height: int = 1400):
    """A headless Chromium (selenium) with its own profile folder; fails, never skips, when
    the browser, its driver or selenium is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install Debian's browser with "
                    f"`apt-get install -y chromium chromium-driver` (the dashboard's browser "
                    f"tests need it)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium (the `test` extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync",
              f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()

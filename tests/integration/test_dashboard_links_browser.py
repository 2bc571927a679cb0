"""Deep links, run switching and live pages in a real headless Chromium (selenium with
Debian's chromium and chromedriver) on one `streamlit run` server over a runs root holding
conftest.py's run_pair ("a" and "b"; the tests use "b", the picker's second run): every link
on the Dynamics, Neurons and Attention pages opens run "b" at the linked view, a copied URL
opens the same view in a new browser session, switching runs leaves nothing of the old
run's view, and a page opened before a training has created its store follows that run
on its own: its first appearance, each new capture and its final status."""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from browser_env import chromium, serve_dashboard
from helpers import TINY_ARGS, popen
from store.errors import StoreError
from store.reader import RunStore

pytestmark = pytest.mark.integration

REFRESH_S = 2.0  # dashboard.state.LIVE_EVERY_S (not imported: it would import streamlit here)
# The live run: TINY_ARGS' model for 40 steps, captured at every step (its store appears
# after the trainer's start-up, ~5-15 s, then a capture every few tenths of a second).
LIVE_STEPS = 40
LIVE_ARGS = [*TINY_ARGS, "--max-steps", str(LIVE_STEPS), "--capture.every=1",
             "--eval.every=20"]


@pytest.fixture(scope="module")
def root(run_pair, tmp_path_factory) -> Path:
    """A runs root with "a" and "b" (links to run_pair's), where the live test's training
    writes its own run later."""
    r = tmp_path_factory.mktemp("links_root")
    for k in "ab":
        (r / k).symlink_to(run_pair[k], target_is_directory=True)
    return r


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("streamlit_links")
    with serve_dashboard(["--runs-root", str(root)], log_dir) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile-links")) as drv:
        yield drv


# ----------------------------------------------------------------------------- the page

VIEW_JS = """
const side = document.querySelector('[data-testid="stSidebar"]');
const runs = [];
const opts = '[aria-label="Run"] label[data-testid="stRadioOption"]';
for (const o of document.querySelectorAll(opts)) {
  const cap = o.parentElement.querySelector('[data-testid="stRadioCaption"]');
  runs.push([o.innerText.trim(), o.getAttribute('data-selected') === 'true',
             cap ? cap.innerText.trim() : '']);
}
const titles = [];
for (const gd of document.querySelectorAll('.js-plotly-plot')) {
  const t = gd.layout && gd.layout.title && gd.layout.title.text;
  if (t) titles.push(t.replace(/<[^>]*>/g, ''));
}
const alerts = {};
for (const kind of ['Warning', 'Error', 'Info', 'Success']) {
  alerts[kind.toLowerCase()] = Array.from(
    document.querySelectorAll('[data-testid="stAlertContent' + kind + '"]'),
    e => e.innerText.trim());
}
const links = Array.from(document.querySelectorAll('[data-testid="stMain"] a[href*="page="]'),
                         a => [a.innerText.trim(), a.getAttribute('href')]);
return {runs: runs, titles: titles, alerts: alerts, links: links,
        running: !!document.querySelector('[data-testid="stStatusWidget"]'),
        side: side ? side.innerText : '', main: document.body.innerText,
        headers: Array.from(document.querySelectorAll('[data-testid="stHeading"]'),
                            e => e.innerText.trim())};
"""


def view(drv) -> dict:
    """What the page shows: the sidebar's runs ([name, selected, caption]), chart titles,
    alerts by kind, links to pages, headings, and whether a script run is in progress."""
    return drv.execute_script(VIEW_JS)


def chosen(v: dict) -> str | None:
    return next((name for name, sel, _ in v["runs"] if sel), None)


def query(u: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(u).query))


def wait(drv, pred, what: str, timeout: float = 60) -> dict:
    """Until pred(view) holds, the script is not running and the charts drawn stay the
    same for two looks 0.4 s apart (plotly draws a moment after the script's run); the
    view then."""
    t0, v, last = time.time(), {}, None
    while time.time() - t0 < timeout:
        try:
            v = view(drv)
        except Exception:  # noqa: BLE001 - a page still loading
            v = {}
        ok = bool(v) and not v["running"] and pred(v)
        if ok and last is not None and last["titles"] == v["titles"]:
            return v
        last = v if ok else None
        time.sleep(0.4)
    raise AssertionError(f"timed out waiting for {what}; at {drv.current_url} the page "
                         f"shows charts {v.get('titles')}, alerts {v.get('alerts')}:\n"
                         f"{v.get('main', '')[-1500:]}")


def fresh_session(drv, url: str, pred, what: str) -> dict:
    """`url` in a new browser session: no cookie or storage of the last one."""
    drv.delete_all_cookies()
    try:
        drv.execute_script("window.sessionStorage.clear(); window.localStorage.clear();")
    except Exception:  # noqa: BLE001 - a blank tab has no storage
        pass
    drv.get(url)
    return wait(drv, pred, what)


def loaded(page_header: str, n_charts: int = 1):
    return lambda v: page_header in v["headers"] and len(v["titles"]) >= n_charts


def no_warning(v: dict) -> None:
    assert not v["alerts"]["warning"] and not v["alerts"]["error"], v["alerts"]


def follow(drv, href: str, pred, what: str) -> tuple[dict, str]:
    """Click the link to `href` on the page (it opens a new tab: a new session) and wait
    for its view there; the tab is closed after. (view, the new tab's URL)."""
    from selenium.webdriver.common.by import By
    home = drv.current_window_handle
    before = set(drv.window_handles)
    link = next(a for a in drv.find_elements(By.CSS_SELECTOR, "[data-testid='stMain'] a")
                if a.get_attribute("href") and a.get_attribute("href").endswith(href))
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", link)
    link.click()
    t0 = time.time()
    while set(drv.window_handles) == before and time.time() - t0 < 10:
        time.sleep(0.1)
    new = set(drv.window_handles) - before
    if new:
        drv.switch_to.window(new.pop())
    try:
        v = wait(drv, pred, what)
        return v, drv.current_url
    finally:
        if new or drv.current_window_handle != home:
            drv.close()
            drv.switch_to.window(home)


# ----------------------------------------------------------------------------- links

def test_links_open_run_b_at_the_linked_view(server, browser, run_pair):
    rs = RunStore(run_pair["b"] / "capture.zarr")
    last, full = int(rs.steps()[-1]), [int(s) for s in rs.steps("full")]
    v = fresh_session(browser, f"{server}/?page=dynamics&run=b", loaded("Dynamics", 5),
                      "the Dynamics page of b")
    assert chosen(v) == "b"
    no_warning(v)
    links = v["links"]
    assert links and all(query(h)["run"] == "b" for _, h in links), links
    pages = {query(h)["page"] for _, h in links}
    assert {"attention", "neurons", "prompt"} <= pages, links
    # one link to each page, followed in the browser: run "b" at the link's view
    href = next(h for _, h in links if query(h)["page"] == "attention")
    q = query(href)
    v2, u = follow(browser, href, loaded("Attention", 2), "the Attention link")
    assert chosen(v2) == "b" and v2["titles"][0] == (
        f"Layer {q['layer']}, head {q['head']}, step {q['step']}, sequence 0")
    assert int(q["step"]) in full
    assert {k: query(u)[k] for k in q} == q  # the URL keeps naming the linked view
    no_warning(v2)
    href = next(h for _, h in links if query(h)["page"] == "neurons")
    q = query(href)
    v2, u = follow(browser, href, loaded("Neurons", 3), "the Neurons link")
    assert chosen(v2) == "b" and f"Neuron {q['neuron']} across training" in v2["titles"]
    assert (f"the {rs.hooks[q['hook']]} neurons of {q['hook']} at step {q['step']}"
            in " ".join(v2["titles"]))
    assert {k: query(u)[k] for k in q} == q
    no_warning(v2)
    # the Neurons page's own link (to the Prompt page), and the Attention page's
    neuron_links = v2["links"]
    assert neuron_links and all(query(h)["run"] == "b" for _, h in neuron_links)
    v = fresh_session(browser, f"{server}/?page=attention&run=b&layer=1&head=1&step={last}",
                      loaded("Attention", 2), "the Attention page of b")
    assert v["titles"][0] == f"Layer 1, head 1, step {last}, sequence 0"
    attn_links = v["links"]
    assert attn_links and all(query(h)["run"] == "b" and query(h)["page"] == "prompt"
                              for _, h in attn_links)
    assert {k: query(attn_links[0][1]).get(k) for k in ("layer", "head", "step")} == {
        "layer": "1", "head": "1", "step": str(last)}
    # (the Prompt page a link opens: test_dashboard_links.py's round trip of its view, which
    # spares this module the page's model load)


def test_a_copied_url_opens_the_same_view(server, browser, run_pair):
    mlp = "blocks.1.mlp.hook_post"
    v = fresh_session(browser, f"{server}/?page=neurons&run=b&hook={mlp}&neuron=5&step=4"
                      f"&stat=max", loaded("Neurons", 3), "the Neurons view")
    copied = browser.current_url
    assert {k: query(copied)[k] for k in ("page", "run", "hook", "neuron", "step", "stat")} \
        == {"page": "neurons", "run": "b", "hook": mlp, "neuron": "5", "step": "4",
            "stat": "max"}
    again = fresh_session(browser, copied, loaded("Neurons", 3), "the copied URL")
    assert again["titles"] == v["titles"] and chosen(again) == "b"
    assert query(browser.current_url) == query(copied)
    no_warning(again)


def test_switching_runs_leaves_no_stale_value(server, browser):
    from selenium.webdriver.common.by import By
    bare = fresh_session(browser, f"{server}/?page=neurons&run=a", loaded("Neurons", 3),
                         "run a's Neurons page")
    a_url = query(browser.current_url)
    fresh_session(browser, f"{server}/?page=neurons&run=b&hook=blocks.1.mlp.hook_post"
                  f"&neuron=5&step=4&stat=max", loaded("Neurons", 3), "b's linked view")
    opt = next(o for o in browser.find_elements(
        By.CSS_SELECTOR, "[aria-label='Run'] label[data-testid='stRadioOption']")
        if o.text.strip().startswith("a"))
    opt.click()
    # a's defaults (no neuron, step or hook of b's): the same charts and URL as a's bare
    # link (plotly draws a moment after the script's run: the view is awaited)
    v = wait(browser, lambda v: chosen(v) == "a" and v["titles"] == bare["titles"]
             and query(browser.current_url) == a_url, "run a at its defaults")
    no_warning(v)


# ----------------------------------------------------------------------------- live

def _caption(v: dict, name: str) -> tuple[str, int] | None:
    """(status word, captures) from run `name`'s caption in the sidebar."""
    for n, _, cap in v["runs"]:
        m = re.match(r"(\w+) · .* captures (\d+) \(", cap)
        if n == name and m:
            return m.group(1), int(m.group(2))
    return None


def test_a_page_follows_a_live_run(server, browser, root, shakespeare_data):
    """The Neurons page of a run not created yet, opened before its training starts: it
    shows the run once its store is created, then each new capture and at last the
    "finished" status, each within 3 refresh periods of the store's, with no interaction;
    and then it stops refreshing."""
    late = 3 * REFRESH_S
    v = fresh_session(browser, f"{server}/?page=neurons&run=live",
                      lambda v: any("No run 'live'" in t for t in v["alerts"]["info"]),
                      "the page waiting for the run")
    assert chosen(v) is None and "Live: waiting for run 'live'" in v["side"]
    proc = popen(["-m", "trainer", "--data", str(shakespeare_data), "--run-dir",
                  str(root / "live"), *LIVE_ARGS])
    store = root / "live" / "capture.zarr"
    rs, t0 = None, time.time()
    events: list[tuple[float, str, int]] = []   # the store's (time, status, captures)
    seen: list[tuple[float, tuple | None, bool, list]] = []  # the page's
    try:
        while time.time() - t0 < 150:
            now = time.time()
            if rs is None and store.is_dir():
                try:
                    rs = RunStore(store)
                except StoreError:
                    pass  # still being created
            if rs is not None:
                k = (rs.status, int(len(rs.steps())))
                if not events or events[-1][1:] != k:
                    events.append((now, *k))
            try:
                pv = view(browser)
            except Exception:  # noqa: BLE001 - the page mid-update
                pv = None
            if pv is not None:
                s = (_caption(pv, "live"), chosen(pv) == "live", "Live:" in pv["side"],
                     pv["titles"])
                if not seen or seen[-1][1:] != s:
                    seen.append((now, *s))
            if events and events[-1][1] == "finished" and seen and seen[-1][1] and \
                    seen[-1][1][0] == "finished" and now - events[-1][0] > late:
                break
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events and events[-1][1:] == ("finished", LIVE_STEPS + 1), events[-3:]

    def first_seen(pred) -> float:
        return next((t for t, *s in seen if pred(*s)), float("inf"))

    def report() -> str:
        return (f"store: {[(round(t - t0, 1), *e) for t, *e in events]}\npage: "
                f"{[(round(t - t0, 1), c, sel, live) for t, c, sel, live, _ in seen]}")

    # the run is shown (and chosen) once its store exists
    created = events[0][0]
    assert first_seen(lambda c, sel, live, titles: sel and c is not None) - created <= late, \
        report()
    # every capture: on the page within 3 refresh periods of its commit
    for t, status, n in events:
        if n:
            shown = first_seen(lambda c, sel, live, titles, n=n: sel and c and c[1] >= n)
            assert shown - t <= late, f"capture {n}\n{report()}"
    # the final status too, the page's step following the run to its last capture, and
    # polling ended (the sidebar's "Live:" line gone)
    done = events[-1][0]
    assert first_seen(lambda c, sel, live, titles: c and c[0] == "finished" and not live) \
        - done <= late, report()
    last = seen[-1]
    assert last[1] == ("finished", LIVE_STEPS + 1) and not last[3]
    assert any(t.endswith(f"at step {LIVE_STEPS}") for t in last[4]), last[4]
    no_warning(view(browser))

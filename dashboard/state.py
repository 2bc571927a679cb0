"""Each page's view lives in the URL, and a live run's page follows the run on its own.

The URL: `?page=neurons&run=tiny&hook=blocks.1.mlp.hook_post&neuron=185&step=40`. `run` is
the run's folder name under the runs root (or `store=URL` for a store typed in the sidebar);
the other parameters are the page's widgets (VIEW). A new browser session (a link, a shared
or reloaded URL) sets the widgets from the URL once (`seed`); after each run of the script
the URL is rewritten from the widgets (`write_url`), so the address bar always names the
view on screen. Values that do not fit the run are dropped by the pages' checks, which fall
back to the run's defaults without a warning.

Switching runs clears every page's widgets (`switch_run`): nothing of one run's view leaks
into another's (a step, a neuron beyond the new model's width).

Live: while the run's status is not final (or its store does not exist yet, or a link names
a run not created yet), `watch` polls the store's status, committed captures and snapshots
(and those of the other runs listed that still train, for the sidebar's captions) every
LIVE_EVERY_S seconds in a fragment and reruns the whole app when they change, so every
page, the sidebar included, shows the new capture; the final status ends the polling.
"""

from __future__ import annotations

import math
from typing import Callable

import streamlit as st

LIVE_EVERY_S = 2.0
FINAL = ("finished", "stopped", "failed")

# page -> {URL parameter: (session-state key, type)}. A page's widget with that key is in the
# URL. Types: int, float, str, bool, list (of str, comma-separated in the URL).
VIEW: dict[str, dict[str, tuple[str, type]]] = {
    # compare: the other runs overlaid (one session key for both pages, so the choice
    # carries from one to the other)
    "Training": {"logx": ("logx", bool), "compare": ("compare", list),
                 "smooth": ("smooth", float), "x": ("xaxis", str)},
    "Dynamics": {"score": ("dyn_score", str), "hook": ("dyn_hook", str),
                 "layer": ("dyn_dla_layer", int), "neuron": ("dyn_dla_neuron", int),
                 "compare": ("compare", list)},
    "Neurons": {"hook": ("hook", str), "neuron": ("neuron", int), "step": ("neuron_step", int),
                "stat": ("stat", str), "q": ("neuron_q", str)},
    # seq: a probe sequence's number (0, 1, ...) or a repeated random-token one's (r0, r1, ...)
    "Attention": {"layer": ("attn_layer", int), "head": ("attn_head", int),
                  "seq": ("attn_seq", str), "step": ("attn_step", int)},
    "Prompt": {"hook": ("prompt_hook", str), "neuron": ("prompt_neuron", int),
               "layer": ("prompt_layer", int), "head": ("prompt_head", int),
               "step": ("prompt_step", int)},
    "Store": {"array": ("array", str)},
}
# Session keys of the app itself (page, run, store typed in the sidebar; app.py): the only
# ones a switch of runs keeps (switch_run).
KEEP = frozenset({"page", "run", "typed_url", "_view_run", "_run_param", "_seeded"})


def parse(raw: str, typ: type):
    """A URL parameter as its widget's value; None when it does not parse."""
    try:
        if typ is int:
            return int(raw)
        if typ is float:
            v = float(raw)
            return v if math.isfinite(v) else None
        if typ is bool:
            return {"1": True, "true": True, "0": False, "false": False}.get(raw.lower())
        if typ is list:
            return [x for x in raw.split(",") if x]
        return str(raw)
    except (TypeError, ValueError):
        return None


def fmt(value, typ: type) -> str:
    if typ is bool:
        return "1" if value else "0"
    if typ is list:
        return ",".join(map(str, value))
    if typ is float:
        return f"{value:g}"  # a slider's 0.6000000000000001 reads 0.6
    return str(value)


def url_value(page: str, param: str):
    """The URL's value of one of `page`'s parameters (VIEW), parsed; None if absent/bad."""
    raw = st.query_params.get(param)
    if raw is None or param not in VIEW.get(page, {}):
        return None
    return parse(raw, VIEW[page][param][1])


def seed(page: str, apply: Callable[[str, Callable], None]) -> None:
    """Once per browser session: hand the URL's parameters for `page` to `apply(page,
    take)`, where take(param, ok) returns the parsed value when ok(value), else None (the
    page's checks against the run). Later runs of the script leave the URL to write_url."""
    ss = st.session_state
    if ss.get("_seeded"):
        return
    ss["_seeded"] = True

    def take(param: str, ok: Callable) -> object | None:
        v = url_value(page, param)
        try:
            return v if v is not None and ok(v) else None
        except (TypeError, ValueError):
            return None

    apply(page, take)


def switch_run(run_id: str) -> bool:
    """Called with the chosen run's id on every run of the script; when it differs from
    the last one, drops everything but the app's own keys (KEEP): every page's widgets and
    per-run keys, whatever page made them, so the new run's pages open at their defaults
    and no step, neuron or "seen" list of the old run can reach them. True when the run
    changed."""
    ss = st.session_state
    last = ss.get("_view_run")
    ss["_view_run"] = run_id
    if last is None or last == run_id:
        return False
    for k in list(ss.keys()):
        if k not in KEEP:
            del ss[k]
    return True


def write_url(page: str, run: dict[str, str], keep_url: bool = True) -> None:
    """The URL from the page and its widgets: `run` ({"run": name} or {"store": url}), then
    VIEW[page]'s parameters whose widget exists. A parameter the page has not made a widget
    for yet (e.g. it waits for a first capture) keeps the URL's value."""
    ss = st.session_state
    qp = st.query_params
    want = {"page": page.lower(), **run}
    for param, (key, typ) in VIEW.get(page, {}).items():
        v = ss.get(key)
        if v is not None:
            if fmt(v, typ) != "":  # an empty box or list: its default, no "&q=" in the URL
                want[param] = fmt(v, typ)
        elif param in qp and keep_url:
            want[param] = qp[param]
    if {k: qp[k] for k in qp} != want:
        qp.from_dict(want)


def watch(signature: Callable[[], tuple], first: tuple, live: bool, what: str) -> None:
    """While `live`: poll `signature()` every LIVE_EVERY_S seconds in a fragment and rerun
    the whole app when it differs from `first` (its value when this run of the script
    began, so a change while the page was drawn is not missed). st.rerun's default scope
    is the app, also from inside a fragment: every page and the sidebar are redrawn. A
    rerun that finds nothing live left draws no fragment, which ends the polling. `what`:
    the sidebar's sentence on what is followed."""
    if not live:
        return
    st.sidebar.caption(f"Live: {what} (every {LIVE_EVERY_S:g} s).")

    @st.fragment(run_every=LIVE_EVERY_S)
    def poll() -> None:
        if signature() != first:
            st.rerun()

    poll()

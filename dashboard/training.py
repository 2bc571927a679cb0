"""The Training page: loss, validation loss, learning rate, gradient norm and throughput,
with the captured steps marked; live while the run trains. Other runs of the same runs root
can be overlaid (one colour per run in every chart), smoothed with TensorBoard's debiased
EMA, against step, tokens seen or wall time; the config keys that differ between them and
the run's text samples are shown below. The data functions are in dashboard/compare.py."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
import streamlit as st

from dashboard import compare as C
from dashboard import data as D
from dashboard import state, ui
from store.errors import StoreError

COMPARE_KEY = "compare"          # the compared runs' names: state.VIEW, both pages
PICK_KEY = "_compare_pick"       # the multiselect showing it (Training and Dynamics)
PALETTE = plotly.colors.qualitative.Plotly
RAW_OPACITY = 0.25               # the raw curve behind a smoothed one


# ----------------------------------------------------------------------------- caching

def run_log_key(url: str) -> tuple:
    """What changes as the trainer appends to RUN/metrics.jsonl: its mtime and size."""
    f = C.metrics_file(url)
    try:
        s = f.stat() if f is not None else None
    except OSError:
        s = None
    return () if s is None else (s.st_mtime_ns, s.st_size)


# `key` (run_log_key) is a cache key only: the file is re-read when the trainer appends.
@st.cache_data(show_spinner=False, max_entries=16)
def cached_run_log(url: str, key: tuple) -> dict | None:
    """The text samples and per-step wall times of RUN/metrics.jsonl beside the store;
    None without the file."""
    f = C.metrics_file(url)
    if f is None:
        return None
    recs = C.read_records(f)
    return {"samples": C.samples(recs), "times": C.step_times(recs)}


def _tick(status: str) -> int:
    """A coarse clock while a run trains (its metrics grow every step, between captures):
    a cache key that changes every LIVE_EVERY_S seconds; 0 once the run is over."""
    return int(time.time() // state.LIVE_EVERY_S) if status not in state.FINAL else 0


# ----------------------------------------------------------------------------- runs compared

def compared_runs(url: str) -> dict[str, str]:
    """The sidebar-chosen run and the runs chosen to compare with it: {name: store URL},
    the chosen run first. Shows the multiselect of the other runs of its runs root; the
    choice lives under COMPARE_KEY (in the URL through state.VIEW, shared by the Training
    and Dynamics pages), the widget's own key mirrors it, so it survives leaving a page
    whose widget is then not drawn."""
    ss = st.session_state
    me = C.run_name(url)
    others = C.sibling_runs(url)
    if not others:
        ss.pop(COMPARE_KEY, None)
        return {me: url}
    ss[COMPARE_KEY] = [n for n in ss.get(COMPARE_KEY) or [] if n in others]
    if ss.get(PICK_KEY) != ss[COMPARE_KEY]:
        ss[PICK_KEY] = list(ss[COMPARE_KEY])
    st.multiselect("Compare with", list(others), key=PICK_KEY,
                   on_change=lambda: ss.__setitem__(COMPARE_KEY, list(ss[PICK_KEY])),
                   placeholder="other runs under the same runs root",
                   help=f"Runs beside {me} (folders with a capture.zarr): their curves are "
                        f"drawn over {me}'s, one colour per run.")
    return {me: url, **{n: others[n] for n in ss[COMPARE_KEY]}}


def colours(names) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _status(url: str) -> str:
    try:
        return D.get_store(url).status
    except StoreError:
        return "unknown"


def _load(runs: dict[str, str], chosen_status: str) -> tuple[dict, list[str]]:
    """{name: training_data} of each run that can be read, and sentences for those that
    cannot (a compared store being rewritten, or gone)."""
    out, notes = {}, []
    for i, (name, u) in enumerate(runs.items()):
        try:
            status = chosen_status if i == 0 else _status(u)
            out[name] = D.cached_training(u, D.n_committed(u), _tick(status))
        except StoreError as e:
            notes.append(f"{name} cannot be read: {e}")
    return out, notes


# ----------------------------------------------------------------------------- page

def page(url: str, rs) -> None:
    st.header("Training")
    status = rs.status
    live = status == "training"
    if live:
        st.info(f"The run is training: this page refreshes every {state.LIVE_EVERY_S:g} s.")
    elif status in ("failed", "stopped"):
        st.warning(f"The run {status}: these are its metrics up to then.")
    runs = compared_runs(url)
    smooth, how, logx = _view_widgets()
    # a compared run still training keeps the charts refreshing too
    follow = live or any(_status(u) == "training" for u in list(runs.values())[1:])

    @st.fragment(run_every=state.LIVE_EVERY_S if follow else None)
    def charts() -> None:
        now = rs.status  # re-read: this part reruns on its own while the run trains
        data, notes = _load(runs, now)
        for n in notes:
            st.warning(n)
        d = data.get(C.run_name(url))
        if d is None:
            return
        tr, cap = d["train"], d["captured"]
        if not len(tr) and not len(cap):
            st.info("No metrics and no captures yet: the run is still starting.")
            return
        _headline(d, now)
        _overlay(url, runs, data, d, smooth, how, logx)
        _samples(url)

    charts()
    if len(runs) > 1:
        _config_diff(runs)


def _view_widgets() -> tuple[float, str, bool]:
    """Smoothing, x axis and log-x: outside the live fragment, so a change reruns the whole
    script and the URL (state.write_url) follows it."""
    ss = st.session_state
    v = ss.get("smooth")
    if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= C.MAX_SMOOTH):
        del ss["smooth"]  # from a URL: out of the slider's range
    elif v is not None:
        ss["smooth"] = round(float(v), 2)
    ui.keep_valid("xaxis", C.X_AXES)
    row = st.container(horizontal=True, gap="medium", vertical_alignment="center")
    smooth = row.slider("Smoothing", 0.0, C.MAX_SMOOTH, step=0.01, key="smooth", width=260,
                        help="TensorBoard's exponential moving average, debiased so the "
                             "curve starts at the first value; 0 shows the raw values. "
                             "The raw curve stays faintly behind the smoothed one.")
    how = row.radio("x axis", list(C.X_AXES), format_func=C.X_AXES.get, horizontal=True,
                    key="xaxis", width="content",
                    help="tokens: step x train.global_batch_tokens of each run's config; "
                         "wall time: since the run's first step, from each step's logged "
                         "time.")
    logx = row.checkbox("Log-scale x axis", key="logx", width="content")
    return float(smooth), str(how), bool(logx)


def _headline(d: dict, status: str) -> None:
    """Step, losses, captures and status of the chosen run, each as wide as its text in a
    row that wraps: in equal columns a narrow window (1000 px, with the sidebar) cut the
    values off. Captures keeps its count as the value, the full captures and snapshots
    small below it."""
    tr, va = d["train"], d["val"]
    row = st.container(horizontal=True, gap="medium")
    if len(tr):
        row.metric("Step", int(tr["step"].iloc[-1]), width="content")
        row.metric("Train loss", f"{tr['loss'].iloc[-1]:.4f}", width="content")
    if len(va):
        row.metric("Val loss", f"{va['loss'].iloc[-1]:.4f}", width="content")
    n_snap = len(d["snapshots"])
    row.metric("Captures", len(d["captured"]),
               f"{len(d['full'])} full · {n_snap} snapshot{'' if n_snap == 1 else 's'}",
               delta_color="off", delta_arrow="off", width="content",
               help="Captures committed (every one holds the statistics, top-k and training "
                    "dynamics; full ones also the activations, attention and logit "
                    "effects) and weight snapshots stored.")
    row.metric("Status", D.STATUS_WORDS.get(status, status), width="content")


def _x_of(runs: dict[str, str], data: dict, how: str) -> tuple[dict, str, str | None]:
    """{name: steps -> x} for the chosen axis, the axis title, and the sentence saying why
    the axis fell back to steps (a run without a batch size or wall times), else None."""
    maps, missing = {}, []
    for name, d in data.items():
        u = runs[name]
        tok = C.batch_tokens(D.get_store(u).attrs.get("run"))
        times = None
        if how == "time":
            tr = d["train"]
            if "time" in tr and np.isfinite(tr["time"].to_numpy(np.float64)).any():
                times = pd.DataFrame({"step": tr["step"], "time": tr["time"]}).dropna()
            else:
                log = cached_run_log(u, run_log_key(u))
                times = log["times"] if log is not None else None
        if C.to_x([0], how, tok, times) is None:
            missing.append(name)
        maps[name] = (lambda s, tok=tok, times=times: C.to_x(s, how, tok, times))
    if missing:
        why = ("no per-step time in its store and no metrics.jsonl beside it"
               if how == "time" else "no train.global_batch_tokens in its config")
        return ({n: (lambda s: C.to_x(s, "step")) for n in data}, "step",
                f"{C.X_AXES[how].capitalize()} is not available for {', '.join(missing)} "
                f"({why}): the charts are drawn against step.")
    if how != "time":
        return maps, C.X_AXES[how], None
    span = max((float(np.max(f(data[n]["train"]["step"]))) for n, f in maps.items()
                if len(data[n]["train"])), default=0.0)
    div, unit = C.time_unit(span)
    return ({n: (lambda s, f=f: f(s) / div) for n, f in maps.items()},
            f"wall time ({unit} since the first step)", None)


def _overlay(url, runs, data, d, smooth, how, logx) -> None:
    """The five metrics, one curve per run in the run's colour (its raw values faint behind
    when smoothed); the chosen run's captures marked on the loss curve."""
    xmap, xtitle, note = _x_of(runs, data, how)
    if note:
        st.info(note)
    col = colours(runs)
    series = {n: C.series(x["train"], x["val"]) for n, x in data.items()}
    figs = {}
    for key, title, _, _ in C.METRICS:
        f = go.Figure()
        for name in data:
            s = series[name][key]
            if not len(s):
                continue
            x, y = xmap[name](s["step"]), s["value"].to_numpy()
            line = dict(color=col[name])
            if smooth > 0:
                f.add_scatter(x=x, y=y, mode="lines", name=f"{name} (raw)", line=line,
                              opacity=RAW_OPACITY, legendgroup=name, showlegend=False,
                              hoverinfo="skip")
                y = C.ema(y, smooth)
            f.add_scatter(x=x, y=y, mode="lines+markers" if key == "val_loss" else "lines",
                          name=name, line=line, legendgroup=name)
        figs[key] = f
    _mark_captures(figs["loss"], d, series[C.run_name(url)]["loss"], xmap[C.run_name(url)],
                   smooth, logx)
    xt = "log" if logx else "linear"
    for key, title, _, _ in C.METRICS:
        ui.fig_layout(figs[key], title, 340 if key in ("loss", "val_loss") else 260)
        figs[key].update_xaxes(type=xt, title=xtitle)
    top = st.columns(2)
    low = st.columns(3)
    for place, (key, _, _, _) in zip([*top, *low], C.METRICS):
        place.plotly_chart(figs[key], key=f"{key}_chart")
    cap, full = d["captured"], d["full"]
    if len(cap):
        st.caption(f"Captured steps: {ui.steps_text(cap)}. Full captures (activations, "
                   f"attention, logit effects): {ui.steps_text(full) or 'none yet'}. "
                   f"Weight snapshots: {ui.steps_text(d['snapshots']) or 'none'}.")


def _mark_captures(fig, d: dict, loss: pd.DataFrame, xmap, smooth: float, logx: bool) -> None:
    """The chosen run's captures on its loss curve (as drawn: smoothed when it is), full
    and summary-only apart."""
    cap, full = d["captured"], d["full"]
    if not len(cap) or not len(loss):
        return
    y_line = C.ema(loss["value"].to_numpy(), smooth) if smooth > 0 else loss["value"]
    is_full = np.isin(cap, full)
    for name, pick, symbol in (("full capture", is_full, "triangle-down"),
                               ("summary capture", ~is_full, "triangle-down-open")):
        if not pick.any():
            continue
        steps = np.maximum(cap[pick], 1) if logx else cap[pick]
        y = np.interp(steps, loss["step"], y_line)
        fig.add_scatter(x=xmap(steps), y=y, mode="markers", name=name,
                        marker=dict(symbol=symbol, size=9, color="black"))


def _samples(url: str) -> None:
    st.subheader("Text samples")
    log = cached_run_log(url, run_log_key(url))
    if log is None:
        st.info("Text samples are not available: they are in the metrics.jsonl of the run "
                "folder holding the store, and this store has none beside it.")
        return
    df = log["samples"]
    if not len(df):
        st.caption("No text samples yet: the trainer writes one at each evaluation "
                   "(eval.every) when eval.sample_tokens > 0 and a tokenizer is at hand.")
        return
    st.caption(f"{len(df)} sample{'' if len(df) == 1 else 's'} by step; the latest in "
               f"full below.")
    st.dataframe(df, hide_index=True, key="samples_table",
                 column_config={"sample": st.column_config.TextColumn(width="large")})
    st.code(df["sample"].iloc[-1], language=None)


def _config_diff(runs: dict[str, str]) -> None:
    st.subheader("Config differences")
    configs = {}
    for name, u in runs.items():
        try:
            configs[name] = D.get_store(u).attrs.get("run") or {}
        except StoreError:
            continue
    diff = C.config_diff(configs)
    if not len(diff):
        st.caption("The compared runs' configs are the same (their run folders aside).")
        return
    st.caption("The config keys whose values differ between the compared runs (from each "
               "store's resolved run config).")
    st.dataframe(diff, hide_index=True, key="config_diff_table")

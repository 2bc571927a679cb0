"""The Neurons page: one hook's neurons at a captured step (statistics, histogram, table),
one neuron across training, and its top-activating tokens."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data as D
from dashboard import prompt as PR
from dashboard import ui
from store.schema import STATS


def tokens_html(rows: list[dict]) -> str:
    scale = max([abs(r["value"]) for r in rows] + [1e-6])
    out = ["<div style='font-family:monospace;font-size:0.9em;line-height:1.9'>"]
    for r in rows:
        spans = []
        for j, (t, a) in enumerate(zip(r["tokens"], r["acts"])):
            top = r["start"] + j == r["pos"]
            txt = html.escape(t).replace("\n", "⏎").replace(" ", "&nbsp;") or "&nbsp;"
            title = f"{a:.3f}" if a is not None and np.isfinite(a) else "not stored"
            style = f"background:{ui.color(a if a is not None else np.nan, scale)};"
            if top:
                style += "border:1px solid black;font-weight:bold;"
            spans.append(f"<span class='tok' title='{title}' style='{style}'>{txt}</span>")
        out.append(f"<div class='toprow'><b>{r['value']:.3f}</b> &nbsp; seq {r['seq']}, "
                   f"pos {r['pos']}: &nbsp;{''.join(spans)}</div>")
    out.append("</div>")
    return "".join(out)


def page(url: str, rs) -> None:
    st.header("Neurons")
    steps = rs.steps()
    if not len(steps):
        st.info(ui.EMPTY)
        return
    n = len(steps)
    c1, c2 = st.columns([1, 2])
    if st.session_state.get("hook") not in rs.hooks:
        st.session_state.pop("hook", None)
    hook = c1.selectbox("Hook", list(rs.hooks), key="hook",
                        format_func=lambda h: h if h in rs.act_hooks else
                        f"{h} (statistics only)",
                        help="Every hook has per-neuron statistics and top-k at every "
                             "capture; full captures also keep the activations of those not "
                             "marked 'statistics only'.")
    width = rs.hooks[hook]
    with c2:
        step = ui.step_slider(steps, "neuron_step")
    table = D.cached_neuron_table(url, n, hook, step)
    ui.keep_valid("stat", STATS)
    stat = st.selectbox("Statistic", STATS, key="stat")

    left, right = st.columns(2)
    fig = go.Figure(go.Histogram(x=table[stat], nbinsx=50))
    ui.fig_layout(fig, f"{stat} of the {width} neurons of {hook} at step {step}")
    fig.update_xaxes(title=stat).update_yaxes(title="neurons")
    left.plotly_chart(fig, key="hist")
    with right:
        st.caption(f"{width} neurons at step {step} (click a column to sort)")
        st.dataframe(table, height=300, key="neuron_table")

    cur = st.session_state.get("neuron")
    if not isinstance(cur, int) or not 0 <= cur < width:  # first time, or another hook's
        st.session_state["neuron"] = int(table["max"].fillna(-np.inf).to_numpy().argmax())
    neuron = int(st.number_input("Neuron", 0, width - 1, key="neuron"))
    st.caption(f"[Neuron {neuron} on your own text (Prompt page)]"
               f"({PR.prompt_link(hook=hook, neuron=neuron, step=step)})")
    hist = D.cached_neuron_history(url, n, hook, neuron)
    left, right = st.columns(2)
    f = make_subplots(specs=[[{"secondary_y": True}]])
    f.add_scatter(x=hist["step"], y=hist["mean"], name="mean", mode="lines+markers")
    f.add_scatter(x=hist["step"], y=hist["max"], name="max", mode="lines+markers")
    f.add_scatter(x=hist["step"], y=hist["frac_active"], name="frac_active",
                  mode="lines+markers", secondary_y=True, line=dict(dash="dot"))
    ui.fig_layout(f, f"Neuron {neuron} across training").update_xaxes(title="step")
    f.update_yaxes(title="activation", secondary_y=False)
    f.update_yaxes(title="fraction active", secondary_y=True, range=[0, 1])
    left.plotly_chart(f, key="neuron_history")

    lo, hi = right.slider("Neurons in the heatmap", 0, width, (0, min(width, 64)),
                          key=f"range::{hook}")
    hs, z = D.cached_heatmap(url, n, hook, stat, lo, max(hi, lo + 1))
    h = go.Figure(go.Heatmap(z=z, x=[str(s) for s in hs], y=list(range(lo, lo + z.shape[0])),
                             colorscale="RdBu_r", zmid=0, colorbar=dict(title=stat)))
    ui.fig_layout(h, f"{stat} of neurons {lo}-{lo + z.shape[0] - 1} by step")
    h.update_xaxes(title="step", type="category").update_yaxes(title="neuron")
    right.plotly_chart(h, key="heatmap")

    st.subheader(f"Top-activating tokens of neuron {neuron} at step {step}")
    rows = D.cached_top_tokens(url, n, hook, step, neuron)
    if rows:
        st.markdown(tokens_html(rows), unsafe_allow_html=True)
        if not any(r.get("from_acts") for r in rows):
            if hook not in rs.act_hooks:
                why = (f"{hook} keeps statistics and top-k only (its activations are not "
                       f"stored: capture.hooks)")
            else:
                near = D.nearest_full(rs, step)
                why = (f"step {step} is a summary capture; activations are kept at full "
                       f"captures" + (f" (nearest: step {near})" if near is not None
                                      else " (none committed yet)"))
            st.caption(f"Only each top token is coloured: {why}.")
    else:
        st.info("No top-k tokens stored for this neuron at this step.")
    t = go.Figure(go.Scatter(x=hist["step"], y=hist["max"], mode="lines+markers",
                             name="top-1 value"))
    t.add_vline(x=step, line_dash="dot")
    ui.fig_layout(t, f"Top activation of neuron {neuron} across steps", 260)
    st.plotly_chart(t, key="top_history")


def apply_link(rs, take) -> None:
    """app.apply_link for this page: hook, neuron, step and statistic from the URL."""
    ss = st.session_state
    steps = {int(s) for s in rs.steps()}
    hook = take("hook", lambda v: v in rs.hooks)
    if hook is not None:
        ss["hook"] = hook
    hook = ss.get("hook", next(iter(rs.hooks), None))
    for name, key, ok in (
            ("neuron", "neuron", lambda v: hook is not None and 0 <= v < rs.hooks[hook]),
            ("step", "neuron_step", lambda v: v in steps),
            ("stat", "stat", lambda v: v in STATS)):
        v = take(name, ok)
        if v is not None:
            ss[key] = v

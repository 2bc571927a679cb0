"""The Neurons page: one hook's neurons at a captured step (statistics, a search by token, a
table to pick from), then one neuron: the histogram of its activations, its top-activating
tokens in context, examples from across its activation range, the tokens it promotes and
suppresses, and its statistics across training."""

from __future__ import annotations

import html
from functools import partial

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data as D
from dashboard import neuron_data as ND
from dashboard import prompt as PR
from dashboard import ui
from store.schema import STATS

WINDOWS = (16, 32, 64, 128, 256)  # neurons in the heatmap around the chosen one
SEARCH_ROWS = 100


def tokens_html(rows: list[dict], scale: float | None = None) -> str:
    """Examples as coloured tokens (each token's activation in its tooltip), the example's
    own token boxed. `scale`: the activation of full colour (default: the rows' largest)."""
    scale = scale or max([abs(r["value"]) for r in rows] + [1e-6])
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


def no_acts_why(rs, hook: str, step: int) -> str:
    """Why `hook`'s activations at `step` are not stored, as a clause."""
    if hook not in rs.act_hooks:
        return (f"{hook} keeps statistics and top-k only (its activations are not stored: "
                f"capture.hooks)")
    near = D.nearest_full(rs, step)
    return (f"step {step} is a summary capture; activations are kept at full captures"
            + (f" (nearest: step {near})" if near is not None else " (none committed yet)"))


def _pick(key: str, index: tuple[int, ...]) -> None:
    """A table's row clicked: that row's neuron becomes the page's (before the rerun draws
    the neuron's widgets, so they show it)."""
    sel = st.session_state.get(key) or {}
    neuron = ND.picked(index, list((sel.get("selection") or {}).get("rows") or []))
    if neuron is not None:
        st.session_state["neuron"] = neuron


def _table(df, key: str, **kw) -> None:
    st.dataframe(df, key=key, on_select=partial(_pick, key, tuple(int(i) for i in df.index)),
                 selection_mode="single-row", **kw)


def page(url: str, rs) -> None:
    st.header("Neurons")
    steps = rs.steps()
    if not len(steps):
        st.info(ui.EMPTY)
        return
    n = len(steps)
    ss = st.session_state
    c1, c2 = st.columns([1, 2])
    if ss.get("hook") not in rs.hooks:
        ss["hook"] = ND.default_hook(rs)
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
    cur = ss.get("neuron")
    if not isinstance(cur, int) or not 0 <= cur < width:  # first time, or another hook's
        ss["neuron"] = int(table["max"].fillna(-np.inf).to_numpy().argmax())

    _search(url, rs, n, hook, step)
    _all_neurons(hook, step, width, table)

    neuron = int(st.number_input("Neuron", 0, width - 1, key="neuron"))
    st.subheader(f"Neuron {neuron} of {hook} at step {step}")
    st.caption(f"[Neuron {neuron} on your own text (Prompt page)]"
               f"({PR.prompt_link(hook=hook, neuron=neuron, step=step)})")
    row = table.loc[neuron]
    for c, s in zip(st.columns(len(STATS)), STATS):
        c.metric(s, f"{row[s]:.4g}")
    col = ND.cached_neuron_acts(url, n, hook, step, neuron)
    left, right = st.columns(2)
    with left:
        _density(url, rs, n, hook, step, neuron, row, col)
    with right:
        _effects(url, rs, n, hook, step, neuron)
    _examples(url, rs, n, hook, step, neuron, col)
    _training(url, n, hook, step, neuron, width)


def _search(url: str, rs, n: int, hook: str, step: int) -> None:
    q = st.text_input("Find neurons by a token", key="neuron_q", placeholder="e.g. the",
                      help="Neurons of this hook at this step with the token among their "
                           "top-activating tokens or, for MLP neurons with logit effects, "
                           "among the tokens they promote. The token's text is matched "
                           "whole, ignoring case and surrounding spaces.")
    if not q.strip():
        return
    idx = ND.cached_search_index(url, n, hook, step)
    res = ND.search(idx, q)
    where = f"their top {rs.k} tokens at step {step}"
    if idx["dla_step"] is not None:
        where += (f" or the {rs.dla_k} tokens they promote"
                  + ("" if idx["dla_step"] == step else
                     f" (at step {idx['dla_step']}, the nearest full capture)"))
    if not len(res):
        st.caption(f"No neuron of {hook} has {q.strip()!r} among {where}.")
        return
    shown = res.head(SEARCH_ROWS)
    st.caption(f"{len(res)} neuron{'' if len(res) == 1 else 's'} with {q.strip()!r} among "
               f"{where}" + (f" (the first {len(shown)} here)" if len(shown) < len(res) else "")
               + "; rank 0: not among the promoted. Click a row to open that neuron.")
    _table(shown, "neuron_search", height=min(300, 38 + 35 * len(shown)), hide_index=False)


def _all_neurons(hook: str, step: int, width: int, table) -> None:
    ui.keep_valid("stat", STATS)
    stat = st.selectbox("Statistic", STATS, key="stat")
    left, right = st.columns(2)
    fig = go.Figure(go.Histogram(x=table[stat], nbinsx=50))
    ui.fig_layout(fig, f"{stat} of the {width} neurons of {hook} at step {step}")
    fig.update_xaxes(title=stat).update_yaxes(title="neurons")
    left.plotly_chart(fig, key="hist")
    with right:
        st.caption(f"{width} neurons at step {step}: click a row to open that neuron "
                   f"(click a column to sort)")
        _table(table, "neuron_table", height=300, hide_index=False)


def _density(url: str, rs, n: int, hook: str, step: int, neuron: int, row, col) -> None:
    """The histogram of the neuron's activations where they are stored, else the
    statistics every capture keeps (no distribution can be drawn from those)."""
    if col is not None:
        h = ND.histogram(col)
        e = h["edges"]
        fig = go.Figure(go.Bar(x=(e[:-1] + e[1:]) / 2, y=h["counts"], width=np.diff(e),
                               name="tokens"))
        ui.fig_layout(fig, f"Activations of neuron {neuron} at step {step}")
        fig.update_xaxes(title="activation").update_yaxes(title="tokens", type="log")
        st.plotly_chart(fig, key="acts_hist")
        st.caption(f"From the stored activations of all {h['n']} tokens of the full capture "
                   f"at step {step} ({rs.n_seqs} sequences x {rs.seq_len}); log scale.")
        return
    vals = [r["value"] for r in ND.cached_top_examples(url, n, hook, step, neuron)]
    fig = go.Figure()
    fig.add_scatter(x=[row["min"], row["max"]], y=[0, 0], mode="lines+markers",
                    name="min to max", line=dict(color="grey"))
    fig.add_scatter(x=[row["mean"]], y=[0.5], mode="markers", name="mean ± std",
                    error_x=dict(type="constant", value=float(row["std"])))
    fig.add_scatter(x=vals, y=[1] * len(vals), mode="markers", name=f"top {len(vals)}",
                    marker=dict(symbol="line-ns-open", size=14))
    ui.fig_layout(fig, f"Statistics of neuron {neuron} at step {step}")
    fig.update_yaxes(visible=False, range=[-0.5, 1.5]).update_xaxes(title="activation")
    st.plotly_chart(fig, key="acts_stats")
    st.caption(f"No histogram: {no_acts_why(rs, hook, step)}. Shown instead what every "
               f"capture keeps of its {rs.n_seqs * rs.seq_len} tokens: min, max, mean and "
               f"std, and the top {len(vals)} values (frac_active "
               f"{row['frac_active']:.3f}); no quantiles are stored.")
    near = D.nearest_full(rs, step)
    if hook in rs.act_hooks and near is not None:
        st.button(f"Open step {near}, the nearest full capture", key="neuron_go_full",
                  on_click=lambda: st.session_state.update(neuron_step=near))


def _effects(url: str, rs, n: int, hook: str, step: int, neuron: int) -> None:
    st.markdown("**Promoted and suppressed tokens**")
    layer = ND.dla_layer(rs, hook)
    if layer is None:
        have = ", ".join(f"blocks.{x}.mlp.hook_post" for x in rs.dla_layers)
        st.caption("Logit effects are stored for the MLP neurons of "
                   + (have if have else "no layer (captured with capture.dynamics=false or "
                                        "capture.dla_topk=0)") + f", not for {hook}.")
        return
    full = D.nearest_full(rs, step)
    if full is None:
        st.info(ui.no_full(rs, "neuron logit effects"))
        return
    st.dataframe(ND.cached_logit_effects(url, n, layer, full, neuron), hide_index=True,
                 key="neuron_effects")
    st.caption("What the neuron writes to the logits directly, per unit of activation, from "
               f"the weights at step {full}"
               + (" (a summary capture has no weights' effects: the nearest full capture)"
                  if full != step else "") + "; the Dynamics page explains the measure.")


def _examples(url: str, rs, n: int, hook: str, step: int, neuron: int, col) -> None:
    st.subheader(f"Top-activating tokens of neuron {neuron} at step {step}")
    rows = ND.cached_top_examples(url, n, hook, step, neuron)
    if not rows:
        st.info("No top-k tokens stored for this neuron at this step.")
        return
    scale = max(abs(r["value"]) for r in rows) or None
    st.markdown(tokens_html(rows, scale), unsafe_allow_html=True)
    ctx = f"Up to {ND.CONTEXT} tokens of context on each side ({rs.seq_len} per sequence)."
    if not any(r.get("from_acts") for r in rows):
        ctx += f" Only each top token is coloured: {no_acts_why(rs, hook, step)}."
    st.caption(ctx)
    st.subheader(f"Examples across the activation range of neuron {neuron}")
    bins = ND.cached_range_examples(url, n, hook, step, neuron)
    if not bins:
        st.caption(f"These need the activations: {no_acts_why(rs, hook, step)}.")
        return
    parts = []
    for b in bins:
        parts.append(f"<div class='rangebin' data-lo='{b['lo']:.6g}' data-hi='{b['hi']:.6g}'>"
                     f"<i>{b['lo']:.3f} to {b['hi']:.3f}: {b['count']} tokens</i>"
                     + (tokens_html(b["rows"], scale) if b["rows"] else "") + "</div>")
    st.markdown("".join(parts), unsafe_allow_html=True)
    st.caption(f"The range from the lowest activation to the highest in {len(bins)} equal "
               f"intervals, highest first, with up to {ND.RANGE_PER_BIN} tokens of each "
               f"drawn at random.")


def _training(url: str, n: int, hook: str, step: int, neuron: int, width: int) -> None:
    st.subheader(f"Neuron {neuron} across training")
    stat = st.session_state.get("stat", STATS[0])
    hist = D.cached_neuron_history(url, n, hook, neuron)
    left, right = st.columns(2)
    f = make_subplots(specs=[[{"secondary_y": True}]])
    f.add_scatter(x=hist["step"], y=hist["mean"], name="mean", mode="lines+markers")
    f.add_scatter(x=hist["step"], y=hist["max"], name="max", mode="lines+markers")
    f.add_scatter(x=hist["step"], y=hist["frac_active"], name="frac_active",
                  mode="lines+markers", secondary_y=True, line=dict(dash="dot"))
    f.add_vline(x=step, line_dash="dot")
    ui.fig_layout(f, f"Neuron {neuron} across training").update_xaxes(title="step")
    f.update_yaxes(title="activation", secondary_y=False)
    f.update_yaxes(title="fraction active", secondary_y=True, range=[0, 1])
    left.plotly_chart(f, key="neuron_history")

    sizes = [w for w in WINDOWS if w < width] + [width]
    ui.keep_valid("neuron::window", sizes)
    size = right.select_slider("Neurons in the heatmap, around this one", sizes,
                               value=min(64, width), key="neuron::window")
    lo, hi = ND.window(neuron, width, size)
    hs, z = D.cached_heatmap(url, n, hook, stat, lo, hi)
    h = go.Figure(go.Heatmap(z=z, x=[str(s) for s in hs], y=list(range(lo, lo + z.shape[0])),
                             colorscale="RdBu_r", zmid=0, colorbar=dict(title=stat)))
    h.add_hline(y=neuron, line_dash="dot", line_color="black")
    ui.fig_layout(h, f"{stat} of neurons {lo}-{lo + z.shape[0] - 1} by step")
    h.update_xaxes(title="step", type="category").update_yaxes(title="neuron")
    right.plotly_chart(h, key="heatmap")

    t = go.Figure(go.Scatter(x=hist["step"], y=hist["max"], mode="lines+markers",
                             name="top-1 value"))
    t.add_vline(x=step, line_dash="dot")
    ui.fig_layout(t, f"Top activation of neuron {neuron} across steps", 260)
    st.plotly_chart(t, key="top_history")


def apply_link(rs, take) -> None:
    """app.apply_link for this page: hook, neuron, step, statistic and search from the
    URL."""
    ss = st.session_state
    steps = {int(s) for s in rs.steps()}
    hook = take("hook", lambda v: v in rs.hooks)
    if hook is not None:
        ss["hook"] = hook
    hook = ss.get("hook", ND.default_hook(rs))
    for name, key, ok in (
            ("neuron", "neuron", lambda v: hook is not None and 0 <= v < rs.hooks[hook]),
            ("step", "neuron_step", lambda v: v in steps),
            ("stat", "stat", lambda v: v in STATS),
            ("q", "neuron_q", lambda v: isinstance(v, str))):
        v = take(name, ok)
        if v is not None:
            ss[key] = v

"""The Attention page: one head's pattern on a probe sequence at a full capture, and all
heads of its layer."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data as D
from dashboard import prompt as PR
from dashboard import ui


def page(url: str, rs) -> None:
    st.header("Attention")
    if not rs.attn_layers or not rs.attn_seqs:
        st.info("This run stores no attention patterns (capture.attn_seqs was 0 or no "
                "attention layers were chosen).")
        return
    if not len(rs.steps()):
        st.info(ui.EMPTY)
        return
    steps = rs.steps("full")
    if not len(steps):
        st.info(ui.no_full(rs, "attention patterns"))
        return
    c = st.columns(3)
    for key, opts in (("attn_layer", rs.attn_layers), ("attn_head", range(rs.n_heads)),
                      ("attn_seq", range(rs.attn_seqs))):
        ui.keep_valid(key, opts)
    layer = c[0].selectbox("Layer", rs.attn_layers, key="attn_layer")
    head = c[1].selectbox("Head", list(range(rs.n_heads)), key="attn_head")
    seq = c[2].selectbox("Probe sequence", list(range(rs.attn_seqs)), key="attn_seq")
    note = st.session_state.pop("attn_note", None)
    if note:
        st.info(note)
    step = ui.step_slider(steps, "attn_step", "full")
    if rs.attn_len < rs.seq_len:
        st.caption(f"The first {rs.attn_len} of {rs.seq_len} query and key positions "
                   f"(capture.attn_len).")
    d = D.cached_attention(url, len(steps), layer, step, seq)
    pat, labels = d["pattern"], d["labels"]
    f = go.Figure(go.Heatmap(z=pat[head], x=labels, y=labels, colorscale="Blues", zmin=0,
                             zmax=1, colorbar=dict(title="attn")))
    ui.fig_layout(f, f"Layer {layer}, head {head}, step {step}, sequence {seq}", 560)
    f.update_yaxes(autorange="reversed", title="query", type="category")
    f.update_xaxes(title="key", type="category")
    st.plotly_chart(f, key="attn_head_chart")
    st.caption(f"[Layer {layer}, head {head} on your own text (Prompt page)]"
               f"({PR.prompt_link(layer=layer, head=head, step=step)})")

    H = pat.shape[0]
    cols = min(H, 4)
    rows = -(-H // cols)
    stride = max(1, pat.shape[-1] // 64)
    sm = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(H)],
                       horizontal_spacing=0.03, vertical_spacing=0.08)
    for h in range(H):
        sm.add_trace(go.Heatmap(z=pat[h, ::stride, ::stride], colorscale="Blues", zmin=0,
                                zmax=1, showscale=False), row=h // cols + 1, col=h % cols + 1)
    sm.update_yaxes(autorange="reversed", showticklabels=False)
    sm.update_xaxes(showticklabels=False)
    ui.fig_layout(sm, f"All {H} heads of layer {layer} at step {step}", 240 * rows + 60)
    st.plotly_chart(sm, key="attn_heads_chart")


def apply_link(rs, take) -> None:
    """app.apply_link for this page: layer, head, sequence and step from the URL. A step
    that is a summary capture opens the nearest full capture, and says so."""
    ss = st.session_state
    steps = {int(s) for s in rs.steps()}
    full = {int(s) for s in rs.steps("full")}
    for name, key, ok in (("layer", "attn_layer", lambda v: v in rs.attn_layers),
                          ("head", "attn_head", lambda v: 0 <= v < rs.n_heads),
                          ("seq", "attn_seq", lambda v: 0 <= v < rs.attn_seqs),
                          ("step", "attn_step", lambda v: v in steps)):
        v = take(name, ok)
        if v is not None and name == "step" and v not in full:
            # a summary capture has no attention: its nearest full capture instead
            near = D.nearest_full(rs, v)
            if near is not None:
                ss["attn_note"] = (f"Step {v} is a summary capture (no attention "
                                   f"patterns): showing step {near}, the nearest full "
                                   f"capture.")
            v = near
        if v is not None:
            ss[key] = v

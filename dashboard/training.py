"""The Training page: loss, validation loss, learning rate, gradient norm and throughput,
with the captured steps marked; live while the run trains."""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboard import data as D
from dashboard import state, ui


def page(url: str, rs) -> None:
    st.header("Training")
    status = rs.status
    live = status == "training"
    if live:
        st.info(f"The run is training: this page refreshes every {state.LIVE_EVERY_S:g} s.")
    elif status in ("failed", "stopped"):
        st.warning(f"The run {status}: these are its metrics up to then.")
    logx = st.checkbox("Log-scale step axis", key="logx")

    @st.fragment(run_every=state.LIVE_EVERY_S if live else None)
    def charts() -> None:
        n = D.n_committed(url)
        tick = int(time.time() // state.LIVE_EVERY_S) if live else 0
        d = D.cached_training(url, n, tick)
        tr, va, cap, full = d["train"], d["val"], d["captured"], d["full"]
        if not len(tr) and not len(cap):
            st.info("No metrics and no captures yet: the run is still starting.")
            return
        c = st.columns([1, 1, 1, 2, 1])  # Captures: "11 (7 full) · 9 snapshots"
        if len(tr):
            c[0].metric("Step", int(tr["step"].iloc[-1]))
            c[1].metric("Train loss", f"{tr['loss'].iloc[-1]:.4f}")
        if len(va):
            c[2].metric("Val loss", f"{va['loss'].iloc[-1]:.4f}")
        c[3].metric("Captures", D.captures_line(len(cap), len(full), len(d["snapshots"])),
                    help="Captures committed (every one holds the statistics, top-k and "
                         "training dynamics; full ones also the activations, attention and "
                         "logit effects) and weight snapshots stored.")
        now = rs.status  # re-read: this part reruns on its own while the run trains
        c[4].metric("Status", D.STATUS_WORDS.get(now, now))
        xt = "log" if logx else "linear"

        fig = go.Figure()
        if len(tr):
            fig.add_scatter(x=tr["step"], y=tr["loss"], mode="lines", name="train loss")
        if len(va):
            fig.add_scatter(x=va["step"], y=va["loss"], mode="lines+markers", name="val loss")
        if len(cap) and len(tr):
            is_full = np.isin(cap, full)
            for name, pick, symbol in (("full capture", is_full, "triangle-down"),
                                       ("summary capture", ~is_full, "triangle-down-open")):
                if not pick.any():
                    continue
                x = np.maximum(cap[pick], 1) if logx else cap[pick]
                y = np.interp(x, tr["step"], tr["loss"])
                fig.add_scatter(x=x, y=y, mode="markers", name=name,
                                marker=dict(symbol=symbol, size=9, color="black"))
        ui.fig_layout(fig, "Loss", 360).update_xaxes(type=xt, title="step")
        st.plotly_chart(fig, key="loss_chart")
        cols = st.columns(3)
        for col, (name, title) in zip(cols, (("lr", "Learning rate"),
                                             ("grad_norm", "Gradient norm"),
                                             ("tokens_per_s", "Tokens per second"))):
            f = go.Figure()
            if name in tr:
                f.add_scatter(x=tr["step"], y=tr[name], mode="lines", name=name)
            ui.fig_layout(f, title, 260).update_xaxes(type=xt, title="step")
            col.plotly_chart(f, key=f"{name}_chart")
        if len(cap):
            st.caption(f"Captured steps: {ui.steps_text(cap)}. Full captures (activations, "
                       f"attention, logit effects): {ui.steps_text(full) or 'none yet'}. "
                       f"Weight snapshots: {ui.steps_text(d['snapshots']) or 'none'}.")

    charts()

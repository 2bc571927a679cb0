"""The Store page: the store's layout, its committed captures and snapshots, its arrays."""

from __future__ import annotations

import streamlit as st

from dashboard import data as D
from dashboard import ui

SIZES_AUTO_MAX = 200  # committed captures up to which the Store page measures bytes on disk


def page(url: str, rs) -> None:
    st.header("Store")
    steps = rs.steps()
    n_full = len(rs.steps("full"))
    snaps = rs.snapshot_steps()
    st.markdown(
        f"**{url}** · schema version {rs.schema_version} · status "
        f"**{D.STATUS_WORDS.get(rs.status, rs.status)}** · updated {rs.updated_at}  \n"
        f"{len(steps)} captures committed ({n_full} full) · {len(snaps)} weight snapshots · "
        f"{rs.max_steps} steps planned · source "
        f"`{rs.source}` · P={rs.n_seqs} sequences x T={rs.seq_len} tokens · top-k={rs.k} · "
        f"attention layers {rs.attn_layers} (H={rs.n_heads}, A={rs.attn_seqs}, first "
        f"{rs.attn_len} positions) · world {rs.world} · {len(rs.hooks)} hooks with "
        f"statistics, {len(rs.act_hooks)} with activations"
        + (" · per-token probe loss" if rs.has_token_loss else ""))
    st.subheader("Captures and snapshots")
    caps = D.cached_captures(url, len(steps), len(snaps))
    if len(caps):
        st.caption("Each committed capture's tiers (summary: statistics, top-k, head scores, "
                   "logit lens, probe loss; full: also activations, attention, logit "
                   "effects) and whether the model's weights at that step are stored.")
        st.dataframe(caps, key="captures_table", hide_index=True)
    else:
        st.caption("No capture and no snapshot committed yet.")
    st.subheader("Arrays")
    # walking every chunk file costs ~1 s per 1,000 captures: on by default for small stores
    sizes = st.checkbox("Measure bytes on disk (lists every chunk file)",
                        value=len(steps) <= SIZES_AUTO_MAX, key="sizes")
    df = D.cached_arrays(url, len(steps), sizes)
    st.caption(f"{len(df)} arrays")
    st.dataframe(df.drop(columns=["axes"]), key="arrays_table", hide_index=True)
    ui.keep_valid("array", df["path"])
    path = st.selectbox("Array", list(df["path"]), key="array")
    row = df[df["path"] == path].iloc[0]
    st.markdown(f"**{path}**: {row['meaning']}. Shape {row['shape']}, {row['dtype']}, "
                f"chunks {row['chunks']}, written by {row['written by']}.")
    st.markdown("\n".join(f"- {a}" for a in row["axes"].split(" | ")))

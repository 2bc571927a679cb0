"""The Attention page: one head's pattern on a sequence at a full capture, and all heads of
its layer. The sequences: the probe set's first A (capture.attn_seqs) and the repeated
random-token ones the duplicate-token and induction scores are measured on (the store's
attn_repeated/*), where a forming induction head draws its stripe. Hovering a cell of the
head's pattern names its query token, its key token and the weight."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data as D
from dashboard import prompt as PR
from dashboard import ui

REP = "r"  # a repeated sequence's picker value and URL value: r0, r1, ...
HOVER = "query %{customdata[0]}<br>key %{customdata[1]}<br>weight %{z:.4f}<extra></extra>"


def seq_options(rs) -> list:
    """The picker's values: probe sequences as their numbers (as the URL has always named
    them), then the repeated sequences as "r0", "r1", ..."""
    return list(range(rs.attn_seqs)) + [f"{REP}{i}" for i in range(rs.repeat_attn_seqs)]


def seq_label(v) -> str:
    return f"repeated random tokens {v[len(REP):]}" if isinstance(v, str) else str(v)


def parse_seq(rs, v) -> int | str | None:
    """A URL's `seq` ("2", "r0") as a picker value, or None when the store has no such
    sequence."""
    s = str(v).strip()
    if s.isdigit():
        return int(s) if int(s) < rs.attn_seqs else None
    if s.startswith(REP) and s[len(REP):].isdigit() and int(s[len(REP):]) < rs.repeat_attn_seqs:
        return f"{REP}{int(s[len(REP):])}"
    return None


def token_text(pos: int, tok: str) -> str:
    """A token as the hover names it: position and the whole decoded text (an axis label
    is its first 18 characters, as data.attention_data and the Prompt page cut them)."""
    return f"{pos}:{tok!r}"


@st.cache_data(show_spinner=False, max_entries=8)
def probe_texts(url: str, n: int, step: int, seq: int, Ta: int) -> list[str]:
    """Hover texts of probe sequence `seq`'s first Ta tokens."""
    rs = D.get_store(url)
    dec = D.get_decoder(D.tokenizer_file(rs))
    probe = rs.probe_tokens()
    toks = probe[seq] if probe is not None else rs.tokens(step, seq)
    return [token_text(i, dec(int(t))) for i, t in enumerate(toks[:Ta])]


@st.cache_data(show_spinner=False, max_entries=8)
def repeated_data(url: str, n: int, layer: int, step: int, r: int) -> dict:
    """Repeated sequence r at a full capture: its pattern [H, Na, Na] (NaN when the capture
    predates this store keeping it), the kept positions, their labels and hover texts, n
    (the half length) and the stripe's cells (rows, columns) into the kept positions."""
    rs = D.get_store(url)
    dec = D.get_decoder(D.tokenizer_file(rs))
    pat = rs.repeated_attention(layer, step, r).astype(np.float32)
    pos = rs.repeated_positions()
    toks = rs.repeated_tokens()[r]
    half = len(toks) // 2
    text = [token_text(int(p), dec(int(toks[p]))) for p in pos]
    # induction stripe: second-half query q attends to q - n + 1, the token after the
    # earlier occurrence of its own token (capture/dynamics.py induction_score)
    col = {int(p): i for i, p in enumerate(pos)}
    cells = [(j, col[int(q) - half + 1]) for j, q in enumerate(pos)
             if q >= half and int(q) - half + 1 in col]
    return {"pattern": pat, "pos": pos, "labels": [t[:18] for t in text], "text": text,
            "half": half, "n_tokens": len(toks), "rows": [c[0] for c in cells],
            "cols": [c[1] for c in cells]}


def _customdata(text: list[str]) -> list[list[list[str]]]:
    """[query][key] -> [query text, key text]: what the hover template shows."""
    return [[[q, k] for k in text] for q in text]


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
                      ("attn_seq", seq_options(rs))):
        ui.keep_valid(key, opts)
    layer = c[0].selectbox("Layer", rs.attn_layers, key="attn_layer")
    head = c[1].selectbox("Head", list(range(rs.n_heads)), key="attn_head")
    seq = c[2].selectbox("Probe sequence", seq_options(rs), key="attn_seq", format_func=seq_label)
    note = st.session_state.pop("attn_note", None)
    if note:
        st.info(note)
    if not rs.repeat_attn_seqs:
        st.caption("The repeated random-token sequences the induction score is measured on "
                   "are not in this store (it was written before their attention was kept, "
                   "or without the duplicate and induction scores): probe sequences only.")
    step = ui.step_slider(steps, "attn_step", "full")
    if isinstance(seq, str):
        r = int(seq[len(REP):])
        d = repeated_data(url, len(steps), layer, step, r)
        if np.isnan(d["pattern"]).all():
            st.info(f"The capture at step {step} holds no pattern of the repeated sequences "
                    f"(it was taken before this store kept them): pick a later step.")
            return
        pat, labels, text = d["pattern"], d["labels"], d["text"]
        what = seq_label(seq)
    else:
        if rs.attn_len < rs.seq_len:
            st.caption(f"The first {rs.attn_len} of {rs.seq_len} query and key positions "
                       f"(capture.attn_len).")
        d = D.cached_attention(url, len(steps), layer, step, seq)
        pat, labels = d["pattern"], d["labels"]
        text = probe_texts(url, len(steps), step, seq, pat.shape[-1])
        what = f"sequence {seq}"
    f = go.Figure(go.Heatmap(z=pat[head], x=labels, y=labels, colorscale="Blues", zmin=0,
                             zmax=1, colorbar=dict(title="attn"),
                             customdata=_customdata(text), hovertemplate=HOVER))
    if isinstance(seq, str) and d["rows"]:
        size = max(4, min(18, 420 // len(labels)))
        f.add_trace(go.Scatter(x=[labels[i] for i in d["cols"]],
                               y=[labels[j] for j in d["rows"]], mode="markers",
                               name="induction stripe", hoverinfo="skip", showlegend=False,
                               marker=dict(symbol="square-open", size=size, color="#ff7f0e",
                                           line=dict(width=2))))
    ui.fig_layout(f, f"Layer {layer}, head {head}, step {step}, {what}", 560)
    f.update_yaxes(autorange="reversed", title="query", type="category")
    f.update_xaxes(title="key", type="category")
    st.plotly_chart(f, key="attn_head_chart")
    if isinstance(seq, str):
        st.caption(stripe_caption(rs, d, layer, head, step))
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


def stripe_caption(rs, d: dict, layer: int, head: int, step: int) -> str:
    """Where the induction stripe is on the repeated sequence, and what it weighs."""
    n, N, pos = d["half"], d["n_tokens"], d["pos"]
    out = (f"{n} random tokens, then the same {n} again: the sequences the duplicate-token "
           f"and induction scores are measured on. Orange squares: the induction stripe, "
           f"each second-half query q at key q - {n - 1} (the token after the earlier "
           f"occurrence of q's token), the diagonal {n - 1} below the main one in the "
           f"second half; a duplicate-token head lights the one {n} below.")
    if len(pos) < N:
        first = int(np.sum(pos < n))
        out += (f" Positions kept (capture.attn_len): 0-{first - 1} of the first half and "
                f"{n}-{int(pos[-1])} of the second, {len(pos)} of {N}; the stripe shown is "
                f"its first {len(d['rows'])} queries of {n}.")
    stripe = d["pattern"][head][d["rows"], d["cols"]]
    if len(stripe):
        out += f" Mean weight on the stripe shown: {float(np.mean(stripe)):.3f}."
    if "induction" in rs.head_score_names:
        steps, score = rs.head_scores("induction")
        i = np.flatnonzero(steps == step)
        if len(i):
            out += (f" This head's induction score at step {step}: "
                    f"{float(score[i[0], layer, head]):.3f} (the stripe's mean over all {n} "
                    f"second-half queries of every repeated sequence).")
    return out


def apply_link(rs, take) -> None:
    """app.apply_link for this page: layer, head, sequence and step from the URL. A step
    that is a summary capture opens the nearest full capture, and says so. `seq` is a
    probe sequence's number or r<i> for repeated sequence i."""
    ss = st.session_state
    steps = {int(s) for s in rs.steps()}
    full = {int(s) for s in rs.steps("full")}
    for name, key, ok in (("layer", "attn_layer", lambda v: v in rs.attn_layers),
                          ("head", "attn_head", lambda v: 0 <= v < rs.n_heads),
                          ("seq", "attn_seq", lambda v: parse_seq(rs, v) is not None),
                          ("step", "attn_step", lambda v: v in steps)):
        v = take(name, ok)
        if v is not None and name == "seq":
            v = parse_seq(rs, v)
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

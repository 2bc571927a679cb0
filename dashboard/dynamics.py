"""The Dynamics page: when heads and neurons form. Its data functions are plain (timed by
benchmarks/dashboard_load.py like data.py's); the page links into the Attention and
Neurons pages at a head, neuron and step through the URL's query parameters. Every chart
here reads the summary tier (every capture) but the neuron logit effects, which only full
captures hold; a link into the Attention page points at a full capture."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import compare as C
from dashboard import data as D
from dashboard import training as T
# the Neurons page shows the logit effects too: one data function for both pages
from dashboard.neuron_data import cached_logit_effects, logit_effects  # noqa: F401
from store.errors import StoreError
from store.reader import RunStore
from store.schema import HEAD_SCORES

SCORE_WORDS = {
    "induction": "induction score: attention from a repeated token to the token after its "
                 "earlier occurrence (repeated random-token probe)",
    "prev_token": "previous-token score: attention to the token just before",
    "duplicate": "duplicate-token score: attention to the earlier occurrence of the same "
                 "token (repeated random-token probe)",
    "entropy": "attention entropy in nats (low: the head looks at few tokens)",
}
PHASE_THRESHOLD = 0.5


def mlp_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def link(page: str, **params) -> str:
    """A URL (query string) opening `page` of this run at these widget values (the run
    chosen in the sidebar, which app.main keeps in session state; dashboard/state.py)."""
    run = st.session_state.get("_run_param") or {}
    return "?" + urlencode({"page": page, **run,
                            **{k: v for k, v in params.items() if v is not None}})


# ----------------------------------------------------------------------------- data

def head_grid(rs: RunStore, score: str) -> dict:
    """One head score as a heads x steps grid: z [L*H, n], row labels "L1 H0", steps."""
    steps, s = rs.head_scores(score)
    L, H = s.shape[1], s.shape[2]
    return {"steps": steps, "z": s.reshape(len(steps), L * H).T if len(steps) else
            np.zeros((L * H, 0), np.float32),
            "labels": [f"L{layer} H{h}" for layer in range(L) for h in range(H)],
            "best_per_layer": s.max(axis=2) if len(steps) else np.zeros((0, L), np.float32)}


def phase_change(rs: RunStore, threshold: float = PHASE_THRESHOLD) -> dict | None:
    """The induction phase change: the first capture where a head's induction score
    reaches `threshold` after being below it (None if none, or no induction score)."""
    if "induction" not in rs.head_score_names:
        return None
    p = rs.phase_change("induction", threshold)
    if p is None:
        return None
    steps, s = rs.head_scores("induction")
    before = float(s[list(steps).index(p.before), p.layer, p.head])
    return {"step": p.step, "before": p.before, "layer": p.layer, "head": p.head,
            "score": p.score, "score_before": before}


def lens_frame(rs: RunStore) -> pd.DataFrame:
    """Logit lens: one row per (step, layer) with the probe loss read off that layer."""
    steps, loss = rs.logit_lens()
    return pd.DataFrame([{"step": int(s), "layer": layer, "loss": float(loss[i, layer])}
                         for i, s in enumerate(steps) for layer in range(loss.shape[1])])


def neuron_hooks(rs: RunStore) -> list[str]:
    """Captured MLP-neuron hooks (those have frac_active, so births and deaths)."""
    return [h for h in rs.hooks if h.endswith("mlp.hook_post")]


def events_data(rs: RunStore, hook: str) -> dict:
    ev = rs.neuron_events(hook)
    table = pd.DataFrame(ev.events, columns=["step", "neuron", "event"])
    return {"steps": ev.steps, "births": ev.births, "deaths": ev.deaths,
            "dead": (~ev.alive).sum(axis=1) if len(ev.steps) else np.zeros(0, np.int64),
            "events": table}


# ----------------------------------------------------------------------------- caching

@st.cache_data(show_spinner=False, max_entries=16)
def cached_head_grid(url: str, n: int, score: str) -> dict:
    return head_grid(D.get_store(url), score)


@st.cache_data(show_spinner=False, max_entries=8)
def cached_phase_change(url: str, n: int) -> dict | None:
    return phase_change(D.get_store(url))


@st.cache_data(show_spinner=False, max_entries=8)
def cached_lens(url: str, n: int) -> pd.DataFrame:
    return lens_frame(D.get_store(url))


@st.cache_data(show_spinner=False, max_entries=16)
def cached_events(url: str, n: int, hook: str) -> dict:
    return events_data(D.get_store(url), hook)


# ----------------------------------------------------------------------------- page

def page(url: str, rs: RunStore, fig_layout, step_slider) -> None:
    st.header("Dynamics")
    if not rs.head_score_names and not rs.has_lens and not rs.dla_layers:
        st.info("This run stores no training dynamics (captured with capture.dynamics=false, "
                "or by a version before them). The Neurons and Attention pages still work.")
        return
    steps = rs.steps()
    if not len(steps):
        st.info("No captures are committed in this store yet: the run is still starting. "
                "This page shows them as soon as the first capture is written.")
        return
    n = len(steps)
    pc = cached_phase_change(url, n)
    if pc:
        st.success(
            f"Induction phase change at step **{pc['step']}**: layer {pc['layer']} head "
            f"{pc['head']}'s induction score reached {pc['score']:.2f} (it was "
            f"{pc['score_before']:.2f} at step {pc['before']}). "
            + _attention_link(rs, pc["layer"], pc["head"], pc["step"])
            + f" [On your own text]"
              f"({link('prompt', layer=pc['layer'], head=pc['head'], step=pc['step'])}).")
    elif "induction" in rs.head_score_names:
        st.info(f"No induction phase change yet: no head's induction score has crossed "
                f"{PHASE_THRESHOLD} between two captures.")
    if rs.head_score_names:
        _heads(url, rs, n, pc, fig_layout)
    if rs.has_lens:
        _lens(url, n, pc, fig_layout)
    if rs.has_token_loss:
        _icl(url, n, pc, fig_layout)
    hooks = neuron_hooks(rs)
    if hooks:
        _events(url, rs, n, hooks, fig_layout)
    if rs.dla_layers:
        _logit_effects(url, rs, fig_layout, step_slider)


def _attention_link(rs: RunStore, layer: int, head: int, step: int) -> str:
    """A markdown link to the head's attention at `step`, or at the nearest full capture
    (at or after it, else before) when `step` is a summary capture; a sentence saying so
    when the store has no full capture yet."""
    full = D.nearest_full(rs, step)
    if full is None:
        return "(Its attention: no full capture yet.)"
    where = f"at step {full}" if full == step else f"at step {full}, the nearest full capture"
    return f"[Its attention {where}]({link('attention', layer=layer, head=head, step=full)})"


def _heads(url: str, rs: RunStore, n: int, pc: dict | None, fig_layout) -> None:
    st.subheader("Heads across training")
    names = [s for s in HEAD_SCORES if s in rs.head_score_names]
    ss = st.session_state
    if ss.get("dyn_score") not in names:  # first time, or a link's score this run lacks
        ss["dyn_score"] = "induction" if "induction" in names else names[0]
    score = st.radio("Score", names, horizontal=True, key="dyn_score")
    st.caption(SCORE_WORDS[score])
    g = cached_head_grid(url, n, score)
    xs = [str(s) for s in g["steps"]]
    zmax = None if score == "entropy" else 1.0
    f = go.Figure(go.Heatmap(z=g["z"], x=xs, y=g["labels"], colorscale="Viridis", zmin=0,
                             zmax=zmax, colorbar=dict(title=score)))
    if pc and str(pc["step"]) in xs:
        # Positions on a category axis are indices: the step itself ("400") would be read as
        # the 400th category and stretch the axis until the heatmap is a sliver.
        col = xs.index(str(pc["step"]))
        f.add_vline(x=col, line_dash="dash", line_color="red")
        f.add_annotation(x=col, y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                         text=f"phase change (step {pc['step']})", font=dict(color="red"))
    fig_layout(f, f"{score} of every head by step", 140 + 22 * len(g["labels"]))
    f.update_xaxes(title="step", type="category").update_yaxes(
        title="head", autorange="reversed", type="category")
    st.plotly_chart(f, key="dyn_heads")
    best = g["best_per_layer"]
    c = go.Figure()
    for layer in range(best.shape[1]):
        c.add_scatter(x=g["steps"], y=best[:, layer], mode="lines+markers",
                      name=f"layer {layer}")
    if pc:
        c.add_vline(x=pc["step"], line_dash="dash", line_color="red")
    fig_layout(c, f"Highest {score} in each layer", 300)
    c.update_xaxes(title="step").update_yaxes(title=score)
    st.plotly_chart(c, key="dyn_best")
    if C.sibling_runs(url):
        _best_by_run(url, score, pc, fig_layout)
    last = g["z"][:, -1]
    order = np.argsort(last)[::-1 if score != "entropy" else 1][:5]
    step = int(g["steps"][-1])
    full = D.nearest_full(rs, step)
    if full is None:
        st.markdown(f"Top heads at step {step}: " + " · ".join(
            f"{g['labels'][i]} ({last[i]:.2f})" for i in order)
            + " (no full capture yet to show their attention)")
        return
    shown = "" if full == step else f" (their attention at step {full}, the nearest full capture)"
    st.markdown(f"Top heads at step {step}{shown}: " + " · ".join(
        f"[{g['labels'][i]} ({last[i]:.2f})]"
        f"({link('attention', layer=int(i) // rs.n_heads, head=int(i) % rs.n_heads, step=full)})"
        for i in order))


def _best_by_run(url: str, score: str, pc: dict | None, fig_layout) -> None:
    """The best head's score (any layer) by step, one curve per compared run: the runs
    chosen here are the Training page's (one session key, state.VIEW's `compare`)."""
    runs = T.compared_runs(url)
    col = T.colours(runs)
    c = go.Figure()
    lacking = []
    for name, u in runs.items():
        try:
            if score not in D.get_store(u).head_score_names:
                lacking.append(name)
                continue
            g = cached_head_grid(u, D.n_committed(u), score)
        except StoreError as e:
            st.warning(f"{name} cannot be read: {e}")
            continue
        c.add_scatter(x=g["steps"], y=C.best_head(g["z"], score), mode="lines+markers",
                      name=name, line=dict(color=col[name]))
    if pc:
        c.add_vline(x=pc["step"], line_dash="dash", line_color="red")
    word = "Lowest" if score == "entropy" else "Highest"
    fig_layout(c, f"{word} {score} of any head, by run", 300)
    c.update_xaxes(title="step").update_yaxes(title=score)
    st.plotly_chart(c, key="dyn_best_by_run")
    if lacking:
        st.caption(f"{', '.join(lacking)} store{'' if len(lacking) > 1 else 's'} no "
                   f"{score} score.")


def _lens(url: str, n: int, pc: dict | None, fig_layout) -> None:
    st.subheader("Logit lens")
    df = cached_lens(url, n)
    f = go.Figure()
    for layer, part in df.groupby("layer"):
        f.add_scatter(x=part["step"], y=part["loss"], mode="lines+markers",
                      name=f"after block {layer}")
    if pc:
        f.add_vline(x=pc["step"], line_dash="dash", line_color="red")
    fig_layout(f, "Probe loss read off each block's output (final LayerNorm + unembedding)")
    f.update_xaxes(title="step").update_yaxes(title="next-token loss (nats)")
    st.plotly_chart(f, key="dyn_lens")


def _icl(url: str, n: int, pc: dict | None, fig_layout) -> None:
    st.subheader("In-context learning")
    st.caption("The probe's mean loss late in the context minus its mean loss early in it "
               "(Olsson et al. 2022): it falls below zero as the model learns to use its "
               "context, most sharply when induction heads form.")
    df = D.cached_icl(url, n)
    f = go.Figure(go.Scatter(x=df["step"], y=df["icl"], mode="lines+markers",
                             name="in-context-learning score"))
    if pc:
        f.add_vline(x=pc["step"], line_dash="dash", line_color="red")
    f.add_hline(y=0, line_color="grey", line_width=1)
    fig_layout(f, "In-context-learning score by step", 300)
    f.update_xaxes(title="step").update_yaxes(title="late loss - early loss (nats)")
    st.plotly_chart(f, key="dyn_icl")


def _events(url: str, rs: RunStore, n: int, hooks: list[str], fig_layout) -> None:
    st.subheader("Neuron births and deaths")
    if st.session_state.get("dyn_hook") not in hooks:
        st.session_state.pop("dyn_hook", None)
    hook = st.selectbox("MLP hook", hooks, key="dyn_hook")
    e = cached_events(url, n, hook)
    st.caption(f"A neuron dies when it is active (> 0) on under 1% of the probe's tokens and "
               f"is born (again) when it rises above 5%. {rs.hooks[hook]} neurons; "
               f"{int(e['dead'][-1])} dead at step {int(e['steps'][-1])}.")
    f = go.Figure()
    f.add_bar(x=e["steps"], y=e["births"], name="births")
    f.add_bar(x=e["steps"], y=-e["deaths"], name="deaths")
    f.add_scatter(x=e["steps"], y=e["dead"], name="dead (total)", mode="lines+markers")
    fig_layout(f, f"Births and deaths of {hook}'s neurons by step", 300)
    f.update_layout(barmode="relative").update_xaxes(title="step").update_yaxes(
        title="neurons")
    st.plotly_chart(f, key="dyn_events")
    ev = e["events"]
    if len(ev):
        rows = ev.tail(20).iloc[::-1]
        st.markdown("Latest events: " + " · ".join(
            f"[{r.event} of neuron {r.neuron} at step {r.step}]"
            f"({link('neurons', hook=hook, neuron=r.neuron, step=r.step)})"
            for r in rows.itertuples()))
    else:
        st.caption("No births or deaths so far.")


def _logit_effects(url: str, rs: RunStore, fig_layout, step_slider) -> None:
    st.subheader("Neuron logit effects")
    steps = rs.steps("full")
    if not len(steps):
        n = len(rs.steps())
        st.info(f"No full capture is committed yet: neuron logit effects are kept at full "
                f"captures only (capture.full_every); this store has {n} summary "
                f"capture{'' if n == 1 else 's'} so far.")
        return
    st.caption("What each MLP neuron writes to the logits directly, from the weights: W_out "
               "centred (as the final LayerNorm centres), times its gain, through the "
               "unembedding; the LayerNorm's scale (a positive per-token number) and bias "
               "are left out, so rankings are exact and values are per unit of that scale.")
    c = st.columns(2)
    ss = st.session_state
    if ss.get("dyn_dla_layer") not in rs.dla_layers:
        ss.pop("dyn_dla_layer", None)
    if not isinstance(ss.get("dyn_dla_neuron"), int) or not 0 <= ss["dyn_dla_neuron"] < rs.d_mlp:
        ss["dyn_dla_neuron"] = 0
    layer = c[0].selectbox("Layer", rs.dla_layers, key="dyn_dla_layer")
    neuron = int(c[1].number_input("Neuron", 0, rs.d_mlp - 1, key="dyn_dla_neuron"))
    step = step_slider(steps, "dyn_dla_step", "full")
    st.dataframe(cached_logit_effects(url, len(steps), layer, step, neuron), hide_index=True,
                 key="dyn_dla_table")
    if mlp_hook(layer) in rs.hooks:
        st.markdown(f"[Neuron {neuron} of layer {layer} in the Neurons page at step {step}]"
                    f"({link('neurons', hook=mlp_hook(layer), neuron=neuron, step=step)}) · "
                    f"[on your own text]"
                    f"({link('prompt', hook=mlp_hook(layer), neuron=neuron, step=step)})")

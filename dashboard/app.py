"""The run dashboard: `streamlit run dashboard/app.py [-- --run-dir RUN | -- --runs-root DIR]`.

Without arguments it lists the runs under `runs/` (or DASHBOARD_RUNS_ROOT); `--run-dir RUN`
(or DASHBOARD_RUN_DIR) opens one run. Pages: Training, Dynamics, Neurons, Attention, Prompt,
Store (sidebar, or `?page=neurons` in the URL; `?page=attention&layer=1&head=0&step=40`,
`?page=neurons&hook=...&neuron=7&step=40` and
`?page=prompt&hook=...&neuron=7&layer=1&head=0&step=40` open them at a head or neuron). It
reads the run's capture store lazily through `store.reader.RunStore`, also while the run trains.
Every capture holds the summary tier (statistics, top-k, head scores, the logit lens, the
probe loss); only full captures hold activations, attention patterns and neuron logit
effects, so the parts that show those offer full steps only.
Imports store, streamlit, plotly, numpy, pandas and tiktoken only: never torch, so it
starts fast (the Prompt page, dashboard/prompt.py, imports torch when it is opened).
"""

from __future__ import annotations

import html
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import streamlit as st  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from dashboard import data as D  # noqa: E402
from dashboard import dynamics as DYN  # noqa: E402
from dashboard import prompt as PR  # noqa: E402
from store.errors import CorruptStore, SchemaVersionError, StoreError, StoreNotFound  # noqa: E402
from store.schema import STATS  # noqa: E402

PAGES = ["Training", "Dynamics", "Neurons", "Attention", "Prompt", "Store"]
LIVE_EVERY_S = 2.0
SIZES_AUTO_MAX = 200  # committed captures up to which the Store page measures bytes on disk
EMPTY = ("No captures are committed in this store yet: the run is still starting. "
         "This page shows them as soon as the first capture is written.")


def no_full(rs, what: str) -> str:
    """The sentence for a page part that needs a full capture when the store has none."""
    n = len(rs.steps())
    return (f"No full capture is committed yet: {what} are kept at full captures only "
            f"(capture.full_every); this store has {n} summary capture{'' if n == 1 else 's'} "
            f"so far. This shows them as soon as the first full capture is written.")


def fig_layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=40, r=10, t=40, b=30),
                      legend=dict(orientation="h", y=-0.2))
    return fig


# ----------------------------------------------------------------------------- sidebar

def pick_run(args: D.Args) -> str | None:
    """The sidebar's run picker; returns the chosen store URL, or None (with a message)."""
    sb = st.sidebar
    sb.title("GPT-2 capture")
    typed = sb.text_input("Run folder, store path or fsspec URL",
                          placeholder="runs/tiny or s3://bucket/run/capture.zarr",
                          key="typed_url").strip()
    if typed:
        url = D.store_url(typed)
        sb.caption(D.summary_line(D.cached_summary(url)))
        return url
    runs = [args.run_dir] if args.run_dir else D.find_runs(args.runs_root)
    if not runs:
        st.info(f"No runs under {args.runs_root!r}: a run is a folder with a capture.zarr "
                f"store (train one with `python -m trainer`, or pass `-- --run-dir RUN` or "
                f"`-- --runs-root DIR`, or type a store URL in the sidebar).")
        return None
    urls = [D.store_url(r) for r in runs]
    sums = [D.cached_summary(u) for u in urls]
    i = sb.radio("Run", range(len(runs)), format_func=lambda j: Path(runs[j]).name or runs[j],
                 captions=[D.summary_line(s) for s in sums], key="run")
    return urls[i or 0]


def pick_page() -> str:
    qp = st.query_params.get("page", "training").capitalize()
    page = st.sidebar.radio("Page", PAGES, index=PAGES.index(qp) if qp in PAGES else 0,
                            key="page")
    if st.query_params.get("page") != page.lower():
        st.query_params["page"] = page.lower()
    return page


def step_slider(steps: np.ndarray, key: str, what: str = "captured") -> int:
    """A slider over `steps` (all captured steps, or only the full ones: `what` = "full"
    names them)."""
    opts = [int(s) for s in steps]
    noun = "full capture" if what == "full" else "captured step"
    if len(opts) == 1:
        st.caption(f"Step {opts[0]} (the only {noun})")
        return opts[0]
    cur = st.session_state.get(key)
    if cur is not None and cur not in opts:  # a resumed run rolled that capture back
        st.warning(f"Step {cur} is no longer captured (a resumed run rolled it back); "
                   f"showing step {opts[-1]}, the latest {noun}.")
    if cur not in opts:  # first time, or a missing capture: go to the latest
        st.session_state[key] = opts[-1]
    label = "Step (full captures)" if what == "full" else "Step (captured steps)"
    return int(st.select_slider(label, options=opts, key=key))


# ----------------------------------------------------------------------------- pages

def page_training(url: str, rs) -> None:
    st.header("Training")
    status = rs.status
    live = status == "training"
    if live:
        st.info(f"The run is training: this page refreshes every {LIVE_EVERY_S:g} s.")
    elif status in ("failed", "stopped"):
        st.warning(f"The run {status}: these are its metrics up to then.")
    logx = st.checkbox("Log-scale step axis", key="logx")

    @st.fragment(run_every=LIVE_EVERY_S if live else None)
    def charts() -> None:
        n = D.n_committed(url)
        tick = int(time.time() // LIVE_EVERY_S) if live else 0
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
        c[4].metric("Status", D.STATUS_WORDS.get(status, status))
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
        fig_layout(fig, "Loss", 360).update_xaxes(type=xt, title="step")
        st.plotly_chart(fig, key="loss_chart")
        cols = st.columns(3)
        for col, (name, title) in zip(cols, (("lr", "Learning rate"),
                                             ("grad_norm", "Gradient norm"),
                                             ("tokens_per_s", "Tokens per second"))):
            f = go.Figure()
            if name in tr:
                f.add_scatter(x=tr["step"], y=tr[name], mode="lines", name=name)
            fig_layout(f, title, 260).update_xaxes(type=xt, title="step")
            col.plotly_chart(f, key=f"{name}_chart")
        if len(cap):
            st.caption(f"Captured steps: {_steps_text(cap)}. Full captures (activations, "
                       f"attention, logit effects): {_steps_text(full) or 'none yet'}. "
                       f"Weight snapshots: {_steps_text(d['snapshots']) or 'none'}.")

    charts()


def _steps_text(steps, most: int = 200) -> str:
    steps = [int(s) for s in steps]
    return ", ".join(map(str, steps[:most])) + (" ..." if len(steps) > most else "")


def _color(a: float, scale: float) -> str:
    if not np.isfinite(a) or scale <= 0:
        return "transparent"
    x = float(np.clip(a / scale, -1, 1))
    return f"rgba(255,120,0,{x:.2f})" if x >= 0 else f"rgba(30,110,255,{-x:.2f})"


def tokens_html(rows: list[dict]) -> str:
    scale = max([abs(r["value"]) for r in rows] + [1e-6])
    out = ["<div style='font-family:monospace;font-size:0.9em;line-height:1.9'>"]
    for r in rows:
        spans = []
        for j, (t, a) in enumerate(zip(r["tokens"], r["acts"])):
            top = r["start"] + j == r["pos"]
            txt = html.escape(t).replace("\n", "⏎").replace(" ", "&nbsp;") or "&nbsp;"
            title = f"{a:.3f}" if a is not None and np.isfinite(a) else "not stored"
            style = f"background:{_color(a if a is not None else np.nan, scale)};"
            if top:
                style += "border:1px solid black;font-weight:bold;"
            spans.append(f"<span class='tok' title='{title}' style='{style}'>{txt}</span>")
        out.append(f"<div class='toprow'><b>{r['value']:.3f}</b> &nbsp; seq {r['seq']}, "
                   f"pos {r['pos']}: &nbsp;{''.join(spans)}</div>")
    out.append("</div>")
    return "".join(out)


def page_neurons(url: str, rs) -> None:
    st.header("Neurons")
    steps = rs.steps()
    if not len(steps):
        st.info(EMPTY)
        return
    n = len(steps)
    c1, c2 = st.columns([1, 2])
    hook = c1.selectbox("Hook", list(rs.hooks), key="hook",
                        format_func=lambda h: h if h in rs.act_hooks else
                        f"{h} (statistics only)",
                        help="Every hook has per-neuron statistics and top-k at every "
                             "capture; full captures also keep the activations of those not "
                             "marked 'statistics only'.")
    width = rs.hooks[hook]
    with c2:
        step = step_slider(steps, "neuron_step")
    table = D.cached_neuron_table(url, n, hook, step)
    stat = st.selectbox("Statistic", STATS, key="stat")

    left, right = st.columns(2)
    fig = go.Figure(go.Histogram(x=table[stat], nbinsx=50))
    fig_layout(fig, f"{stat} of the {width} neurons of {hook} at step {step}")
    fig.update_xaxes(title=stat).update_yaxes(title="neurons")
    left.plotly_chart(fig, key="hist")
    with right:
        st.caption(f"{width} neurons at step {step} (click a column to sort)")
        st.dataframe(table, height=300, key="neuron_table")

    neuron = int(st.number_input("Neuron", 0, width - 1, int(table["max"].fillna(-np.inf)
                                                                .to_numpy().argmax()),
                                 key=f"neuron::{hook}"))
    st.caption(f"[Neuron {neuron} on your own text (Prompt page)]"
               f"({PR.prompt_link(hook=hook, neuron=neuron, step=step)})")
    hist = D.cached_neuron_history(url, n, hook, neuron)
    left, right = st.columns(2)
    f = make_subplots(specs=[[{"secondary_y": True}]])
    f.add_scatter(x=hist["step"], y=hist["mean"], name="mean", mode="lines+markers")
    f.add_scatter(x=hist["step"], y=hist["max"], name="max", mode="lines+markers")
    f.add_scatter(x=hist["step"], y=hist["frac_active"], name="frac_active",
                  mode="lines+markers", secondary_y=True, line=dict(dash="dot"))
    fig_layout(f, f"Neuron {neuron} across training").update_xaxes(title="step")
    f.update_yaxes(title="activation", secondary_y=False)
    f.update_yaxes(title="fraction active", secondary_y=True, range=[0, 1])
    left.plotly_chart(f, key="neuron_history")

    lo, hi = right.slider("Neurons in the heatmap", 0, width, (0, min(width, 64)),
                          key=f"range::{hook}")
    hs, z = D.cached_heatmap(url, n, hook, stat, lo, max(hi, lo + 1))
    h = go.Figure(go.Heatmap(z=z, x=[str(s) for s in hs], y=list(range(lo, lo + z.shape[0])),
                             colorscale="RdBu_r", zmid=0, colorbar=dict(title=stat)))
    fig_layout(h, f"{stat} of neurons {lo}-{lo + z.shape[0] - 1} by step")
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
    fig_layout(t, f"Top activation of neuron {neuron} across steps", 260)
    st.plotly_chart(t, key="top_history")


def page_attention(url: str, rs) -> None:
    st.header("Attention")
    if not rs.attn_layers or not rs.attn_seqs:
        st.info("This run stores no attention patterns (capture.attn_seqs was 0 or no "
                "attention layers were chosen).")
        return
    if not len(rs.steps()):
        st.info(EMPTY)
        return
    steps = rs.steps("full")
    if not len(steps):
        st.info(no_full(rs, "attention patterns"))
        return
    c = st.columns(3)
    layer = c[0].selectbox("Layer", rs.attn_layers, key="attn_layer")
    head = c[1].selectbox("Head", list(range(rs.n_heads)), key="attn_head")
    seq = c[2].selectbox("Probe sequence", list(range(rs.attn_seqs)), key="attn_seq")
    note = st.session_state.pop("attn_note", None)
    if note:
        st.info(note)
    step = step_slider(steps, "attn_step", "full")
    if rs.attn_len < rs.seq_len:
        st.caption(f"The first {rs.attn_len} of {rs.seq_len} query and key positions "
                   f"(capture.attn_len).")
    d = D.cached_attention(url, len(steps), layer, step, seq)
    pat, labels = d["pattern"], d["labels"]
    f = go.Figure(go.Heatmap(z=pat[head], x=labels, y=labels, colorscale="Blues", zmin=0,
                             zmax=1, colorbar=dict(title="attn")))
    fig_layout(f, f"Layer {layer}, head {head}, step {step}, sequence {seq}", 560)
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
    fig_layout(sm, f"All {H} heads of layer {layer} at step {step}", 240 * rows + 60)
    st.plotly_chart(sm, key="attn_heads_chart")


def page_store(url: str, rs) -> None:
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
    path = st.selectbox("Array", list(df["path"]), key="array")
    row = df[df["path"] == path].iloc[0]
    st.markdown(f"**{path}**: {row['meaning']}. Shape {row['shape']}, {row['dtype']}, "
                f"chunks {row['chunks']}, written by {row['written by']}.")
    st.markdown("\n".join(f"- {a}" for a in row["axes"].split(" | ")))


def page_dynamics(url: str, rs) -> None:
    DYN.page(url, rs, fig_layout, step_slider)


def page_prompt(url: str, rs) -> None:
    PR.page(url, rs, fig_layout, _color)


PAGE_FUNCS = {"Training": page_training, "Dynamics": page_dynamics, "Neurons": page_neurons,
              "Attention": page_attention, "Prompt": page_prompt, "Store": page_store}


def apply_link(page: str, rs) -> None:
    """A link from another page (query parameters) sets that page's widgets once; values
    the store does not have are ignored, and the parameters are then dropped from the URL."""
    qp = st.query_params
    ss = st.session_state
    steps = {int(s) for s in rs.steps()}
    full = {int(s) for s in rs.steps("full")} if page == "Attention" else set()

    def take(name: str, ok) -> int | str | None:
        if name not in qp:
            return None
        raw = qp[name]
        del qp[name]
        try:
            v = raw if name == "hook" else int(raw)
        except ValueError:
            return None
        return v if ok(v) else None

    if page == "Attention":
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
    elif page == "Neurons":
        hook = take("hook", lambda v: v in rs.hooks)
        if hook is not None:
            ss["hook"] = hook
        hook = ss.get("hook", next(iter(rs.hooks), None))
        neuron = take("neuron", lambda v: hook is not None and 0 <= v < rs.hooks[hook])
        if neuron is not None:
            ss[f"neuron::{hook}"] = neuron
        step = take("step", lambda v: v in steps)
        if step is not None:
            ss["neuron_step"] = step
    elif page == "Prompt":
        PR.apply_link(rs, take)


def main() -> None:
    st.set_page_config(page_title="GPT-2 capture dashboard", layout="wide")
    args = D.parse_args()
    page = pick_page()
    url = pick_run(args)
    if url is None:
        return
    try:
        rs = D.get_store(url)
    except StoreNotFound as e:
        st.warning(f"No capture store here. {e}")
        return
    except SchemaVersionError as e:
        when = "an older" if "older than this code" in str(e) else "a newer"
        st.error(f"This store was written by {when} version of the project. {e}")
        return
    except CorruptStore as e:
        st.error(f"This store's metadata cannot be read. {e}")
        return
    except StoreError as e:
        st.error(str(e))
        return
    try:
        apply_link(page, rs)
        PAGE_FUNCS[page](url, rs)
    except CorruptStore as e:
        st.error(f"This store's metadata cannot be read. {e}")
    except StoreError as e:
        st.warning(f"{e}")
    except Exception as e:  # noqa: BLE001 - a sentence, never a traceback
        st.error(f"Could not show this page: {type(e).__name__}: {e}")


main()

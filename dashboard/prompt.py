"""The Prompt page: your own text through the run's model at any weight snapshot step, and
through every snapshot ("across training"). It builds on capture.prompt (run_text,
load_model, induction_prompt), which imports torch: this module imports it, and torch,
only inside the functions the page calls, so the other pages never load torch.

What it shows for a text and a step: the tokens coloured by their loss (hover: the top-5
next-token predictions); a chosen neuron's activation on each token (the Neurons page's
colouring); a chosen head's attention (hover a token: where it attends and what attends to
it) and its heatmap; the logit lens at a chosen position. Across training: the per-token
loss, the neuron's activation and the head's attention by snapshot step, and the induction
score of a repeated random-token prompt by step. Results are cached per (run, steps, text,
hooks); a link `?page=prompt&hook=...&neuron=..&layer=..&head=..&step=..` opens it at a
neuron, head and step (app.apply_link calls `apply_link` here)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data as D
from dashboard import dynamics as DYN
from dashboard.prompt_html import acts_html, attention_html, loss_html
from store.errors import UserError
from store.reader import RunStore

DEFAULT_TEXT = "ROMEO: But soft, what light through yonder window breaks?"
IDS_PREFIX = "ids:"
TOP_K = 5
ACROSS_AUTO_MAX = 32   # snapshots up to which "Across training" is on by default
INDUCTION_HALF = 20    # random tokens before the repeat when the store keeps no such probe
SQUARE = ("attn.hook_pattern", "attn.hook_attn_scores")  # [H, T, T]: not a neuron hook
KEYS = ("prompt_text", "prompt_step", "prompt_across", "prompt_hook", "prompt_neuron",
        "prompt_layer", "prompt_head", "prompt_pos")


# ----------------------------------------------------------------------------- the run

def run_dir_of(url: str) -> Path | None:
    """The run folder of a local store (its config.toml beside capture.zarr), else None:
    the model is loaded from the run's config and the store's weight snapshots."""
    if "://" in url and not url.startswith("file://"):
        return None
    p = Path(url[len("file://"):] if url.startswith("file://") else url)
    for run in (p.parent, p):
        if (run / "config.toml").is_file():
            return run
    return None


def model_attrs(rs: RunStore) -> dict:
    return rs.attrs.get("model") or (rs.attrs.get("run") or {}).get("model") or {}


def parse_text(text: str) -> str | tuple[int, ...]:
    """The text box: plain text, or `ids: 464, 3290` (token ids, commas or spaces)."""
    s = text.strip()
    if not s.lower().startswith(IDS_PREFIX):
        return text
    parts = [p for p in re.split(r"[,\s]+", s[len(IDS_PREFIX):]) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise UserError("After 'ids:' give token ids as integers separated by commas or "
                        "spaces, e.g. ids: 464, 3290.") from None


def ids_text(ids) -> str:
    return f"{IDS_PREFIX} " + ", ".join(str(int(t)) for t in ids)


def label(i: int, tok: str) -> str:
    """A token's axis label: position and text, as the Attention page labels them."""
    return f"{i}:{tok!r}"[:18]


def induction_setup(rs: RunStore) -> tuple[int, int, int]:
    """(vocab, half, seed) of the repeated random-token prompt: the capture's own induction
    probe (its first sequence) when the store keeps one, else INDUCTION_HALF tokens from
    the model's vocabulary."""
    m = model_attrs(rs)
    run = rs.attrs.get("run") or {}
    cap, data = run.get("capture") or {}, run.get("data") or {}
    vocab = int(m.get("vocab_size") or 50257)
    try:  # a synthetic data dir's vocabulary may be smaller (trainer/capture_setup.py)
        man = json.loads((Path(data.get("dir") or "") / "manifest.json").read_text())
        vocab = min(vocab, int(man.get("vocab_size") or vocab))
    except (OSError, ValueError, TypeError):
        pass
    rep = rs.repeated_tokens() if any(
        s in rs.head_score_names for s in ("duplicate", "induction")) else None
    block = int(m.get("block_size") or 2 * INDUCTION_HALF)
    half = rep.shape[1] // 2 if rep is not None and rep.size else min(INDUCTION_HALF,
                                                                       block // 2)
    return vocab, max(1, half), int(cap.get("probe_seed") or 0) + 1


# ----------------------------------------------------------------------------- caching
# torch is imported inside these only (through capture.prompt and trainer).

@st.cache_data(show_spinner=False, max_entries=8)
def cached_hooks(run_dir: str) -> list[str]:
    """The model's hooks with one activation per token (no attention patterns)."""
    import torch

    from trainer.config import load_run_config
    from trainer.model import GPT

    cfg = load_run_config(run_dir)
    with torch.device("meta"):
        names = list(GPT(cfg.model).hook_dict)
    return [n for n in names if not n.endswith(SQUARE)]


@st.cache_data(show_spinner=False, max_entries=64)
def cached_tokens(run_dir: str, text: str) -> tuple[list[int], list[str]]:
    from capture.prompt import tokenize

    ids, strs = tokenize(run_dir, text)
    return ids.tolist(), strs


@st.cache_data(show_spinner=False, max_entries=16)
def cached_run(run_dir: str, steps: tuple[int, ...], text: str | tuple[int, ...],
               hooks: tuple[str, ...]):
    """capture.prompt.run_text at `steps` with these hooks, the top-5 and the logit lens."""
    from capture.prompt import run_text

    inp = text if isinstance(text, str) else np.asarray(text, np.int64)
    return run_text(run_dir, inp, steps=list(steps), hooks=list(hooks), top_k=TOP_K,
                    lens=True)


@st.cache_resource(show_spinner=False, max_entries=2)
def cached_model(run_dir: str, step: int):
    from capture.prompt import load_model

    return load_model(run_dir, step)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_lens_top(run_dir: str, step: int, ids: tuple[int, ...]) -> dict:
    """The logit lens's top prediction: each block's output at each position through the
    final LayerNorm and the unembedding; ids [L, T], probs [L, T]."""
    import torch

    model = cached_model(run_dir, step)
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layer)]
    out_i, out_p = [], []
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([list(ids)], dtype=torch.long),
                                        names_filter=lambda n: n in names)
        for n in names:
            z = model.lm_head(model.ln_final(cache[n][0])).float().log_softmax(-1)
            p, i = z.max(-1)
            out_i.append(i.numpy())
            out_p.append(p.exp().numpy())
    return {"ids": np.stack(out_i), "probs": np.stack(out_p)}


@st.cache_data(show_spinner=False, max_entries=8)
def cached_induction(run_dir: str, steps: tuple[int, ...], ids: tuple[int, ...],
                     half: int) -> dict:
    """The repeated prompt through every step: each head's induction score (capture.dynamics,
    as the capture scores its probe) [S, L, H], and the mean loss on the first copy's tokens
    1..half-1 and on the second copy's half+1..2half-1 (those induction can predict)."""
    import torch

    from capture.dynamics import induction_score
    from capture.prompt import run_text

    r = run_text(run_dir, np.asarray(ids, np.int64), steps=list(steps),
                 hooks=["blocks.*.attn.hook_pattern"], top_k=0)
    names = sorted(r.acts, key=lambda n: int(n.split(".")[1]))
    scores = np.stack([np.stack([induction_score(torch.from_numpy(r[n][si:si + 1]), half)
                                 .numpy() for n in names]) for si in range(len(r.steps))])
    return {"steps": r.steps, "scores": scores.astype(np.float32),
            "first": r.loss[:, :half - 1].mean(1), "second": r.loss[:, half:].mean(1)}


# ----------------------------------------------------------------------------- links

def apply_link(rs: RunStore, take: Callable) -> None:
    """app.apply_link for this page: hook, neuron, layer, head and step from the URL. A
    step without a weight snapshot opens the nearest snapshot step, and says so."""
    ss = st.session_state
    m = model_attrs(rs)
    n_layer = int(m.get("n_layer") or rs.n_layers or 0)
    n_head = int(m.get("n_head") or rs.n_heads or 0)
    hook = take("hook", lambda v: v.startswith(("blocks.", "hook_", "ln_final.")))
    if hook is not None:
        ss["prompt_hook"] = hook  # checked against the model's hooks on the page
    for name, key, ok in (("neuron", "prompt_neuron", lambda v: v >= 0),
                          ("layer", "prompt_layer", lambda v: 0 <= v < n_layer),
                          ("head", "prompt_head", lambda v: 0 <= v < n_head)):
        v = take(name, ok)
        if v is not None:
            ss[key] = v
    snaps = rs.snapshot_steps()
    step = take("step", lambda v: True)
    # a step outside the run's snapshots (another run's, a mistyped one) is dropped without
    # a word; one between two snapshots opens the nearest, and says so
    if step is not None and snaps and snaps[0] <= step <= snaps[-1]:
        near = min(snaps, key=lambda s: (abs(s - step), -s))
        if near != step:
            ss["prompt_note"] = (f"Step {step} has no weight snapshot: showing step {near}, "
                                 f"the nearest snapshot step.")
        ss["prompt_step"] = near


def prompt_link(**params) -> str:
    return DYN.link("prompt", **params)


# ----------------------------------------------------------------------------- page

def _slider(steps: list[int], key: str) -> int:
    if len(steps) == 1:
        st.caption(f"Step {steps[0]} (the only weight snapshot)")
        return steps[0]
    if st.session_state.get(key) not in steps:
        st.session_state[key] = steps[-1]
    return int(st.select_slider("Step (weight snapshots)", options=steps, key=key))


def _default(key: str, value, ok: Callable[[object], bool]) -> None:
    if not ok(st.session_state.get(key)):
        st.session_state[key] = value


def _put_induction_prompt(ids: list[int]) -> None:
    st.session_state["prompt_text"] = ids_text(ids)


def page(url: str, rs: RunStore, fig_layout, color: Callable[[float, float], str]) -> None:
    st.header("Prompt")
    ss = st.session_state
    snaps = [int(s) for s in rs.snapshot_steps()]
    if not snaps:
        st.info("This run has no weight snapshots (capture.snapshot_every was 0, or none was "
                "written yet), so there is no model to run text through.")
        return
    run_dir = run_dir_of(url)
    if run_dir is None:
        st.info(f"Running text needs the run's folder (its config.toml beside the store), "
                f"and the store {url} has none there.")
        return
    rd = str(run_dir)
    m = model_attrs(rs)
    block, n_layer = int(m.get("block_size") or 0), int(m.get("n_layer") or rs.n_layers)
    n_head = int(m.get("n_head") or rs.n_heads)
    decode = D.get_decoder(D.tokenizer_file(rs))
    st.caption("Your own text through the model at any weight snapshot step "
               "(capture.prompt.run_text): the loss on each token, a neuron, a head, the "
               "logit lens, and all of them across training. `ids: 464, 3290` in the box "
               "passes token ids.")
    note = ss.pop("prompt_note", None)
    if note:
        st.info(note)
    _default("prompt_text", DEFAULT_TEXT if int(m.get("vocab_size") or 50257) >= 1000 else
             ids_text(_induction_ids(rs)), lambda v: isinstance(v, str))
    text = st.text_area(f"Text (at most {block} tokens, the model's context)",
                        key="prompt_text", height=90)
    c = st.columns([4, 1])
    with c[0]:
        step = _slider(snaps, "prompt_step")
    _default("prompt_across", len(snaps) <= ACROSS_AUTO_MAX, lambda v: isinstance(v, bool))
    across = c[1].toggle("Across training", key="prompt_across",
                         help=f"Run the text through all {len(snaps)} weight snapshots "
                              f"(one model load each).")
    pick = st.columns(4)
    if not text.strip():
        st.info("Type a text in the box (or `ids: 464, 3290`) to run it through the model.")
        return
    try:
        inp = parse_text(text)
        with st.spinner("Loading the tokenizer and the model's hooks (torch, first use)..."):
            hooks = cached_hooks(rd)
            if isinstance(inp, str):
                ids, strs = cached_tokens(rd, inp)
            else:
                ids, strs = list(inp), [decode(t) for t in inp]
    except UserError as e:
        st.warning(str(e))
        return
    if not ids:
        st.info("The text has no tokens: type some text to run it through the model.")
        return
    if block and len(ids) > block:
        st.warning(f"The text is {len(ids)} tokens, more than this model's context of {block} "
                   f"tokens (model.block_size): shorten it.")
        return
    T = len(ids)
    st.caption(f"{T} token{'' if T == 1 else 's'} of at most {block}.")

    mlp = [h for h in hooks if h.endswith("mlp.hook_post")]
    _default("prompt_hook", next((h for h in rs.hooks if h in mlp), (mlp or hooks)[0]),
             lambda v: v in hooks)
    hook = pick[0].selectbox("Hook (neuron)", hooks, key="prompt_hook")
    _default("prompt_layer", 0, lambda v: isinstance(v, int) and 0 <= v < n_layer)
    layer = pick[2].selectbox("Layer (attention)", list(range(n_layer)), key="prompt_layer")
    _default("prompt_head", 0, lambda v: isinstance(v, int) and 0 <= v < n_head)
    head = pick[3].selectbox("Head", list(range(n_head)), key="prompt_head")
    pat_hook = f"blocks.{layer}.attn.hook_pattern"

    run_steps = tuple(snaps) if across else (step,)
    key_text = inp if isinstance(inp, str) else tuple(inp)
    try:
        with st.spinner(f"Running the text through the model at {len(run_steps)} snapshot "
                        f"step{'' if len(run_steps) == 1 else 's'} (loading each)..."):
            r = cached_run(rd, run_steps, key_text, (hook, pat_hook))
    except UserError as e:
        st.warning(str(e))
        return
    if r.token_strs:
        strs = r.token_strs
    si = r.index(step)
    acts = r[hook]            # [S, T, D]
    width = acts.shape[-1]
    _default("prompt_neuron", int(np.abs(acts[si]).max(0).argmax()),
             lambda v: isinstance(v, int) and 0 <= v < width)
    neuron = int(pick[1].number_input(f"Neuron (0-{width - 1})", 0, width - 1,
                                      key="prompt_neuron"))
    labels = [label(i, t) for i, t in enumerate(strs)]
    where = f"step {step} ({r.sources[si]})"

    st.subheader("Loss on each token")
    vocab = int(m.get("vocab_size") or 50257)
    if T > 1:
        st.caption(f"Each token coloured by its loss (the loss of predicting it from the "
                   f"tokens before it; full red: ln(vocab) = {math.log(vocab):.2f} nats, "
                   f"uniform guessing) at {where}; mean {float(r.loss[si].mean()):.3f} nats. "
                   f"Hover a token for its loss and the top-{TOP_K} predictions for the "
                   f"next token.")
    else:
        st.caption("One token: no next-token loss (hover it for the top predictions).")
    st.markdown(loss_html(strs, r.loss[si], r.top.ids[si], r.top.probs[si], decode,
                          math.log(vocab)), unsafe_allow_html=True)

    st.subheader(f"Neuron {neuron} of {hook}")
    a = acts[si, :, neuron]
    st.caption(f"Its activation on each token at {where} (orange positive, blue negative, "
               f"as on the Neurons page; the largest |activation| here: "
               f"{float(np.abs(a).max()):.3f}). "
               + (f"[Neuron {neuron} in the Neurons page]"
                  f"({DYN.link('neurons', hook=hook, neuron=neuron)})" if hook in rs.hooks
                  else ""))
    st.markdown(acts_html(strs, a, color), unsafe_allow_html=True)

    st.subheader(f"Attention of layer {layer}, head {head}")
    pat = r[pat_hook][:, head]    # [S, T, T]
    st.iframe(attention_html(strs, pat[si], f"Layer {layer}, head {head}, {where}."),
              height=150 + 34 * (sum(len(t) + 1 for t in strs) // 100))
    f = go.Figure(go.Heatmap(z=pat[si], x=labels, y=labels, colorscale="Blues", zmin=0,
                             zmax=1, colorbar=dict(title="attn")))
    fig_layout(f, f"Layer {layer}, head {head}, step {step}", 200 + 16 * T)
    f.update_yaxes(autorange="reversed", title="query", type="category")
    f.update_xaxes(title="key", type="category")
    st.plotly_chart(f, key="prompt_attn")

    st.subheader("Logit lens")
    _lens(rd, r, si, step, ids, strs, labels, decode, T)

    if not across:
        st.caption(f"Across training (off): the toggle above runs the text through all "
                   f"{len(snaps)} weight snapshots.")
        return
    _across(url, rs, rd, r, snaps, strs, labels, hook, neuron, layer, head, pat, T,
            fig_layout)


def _induction_ids(rs: RunStore) -> list[int]:
    from capture.prompt import induction_prompt

    vocab, half, seed = induction_setup(rs)
    return induction_prompt(vocab, half, seed).tolist()


def _lens(rd, r, si, step, ids, strs, labels, decode, T) -> None:
    _default("prompt_pos", max(0, T - 2), lambda v: isinstance(v, int) and 0 <= v < T)
    pos = int(st.selectbox("Position", list(range(T)), key="prompt_pos",
                           format_func=lambda i: labels[i]))
    with st.spinner(f"Loading the model at step {step}..."):
        top = cached_lens_top(rd, step, tuple(int(t) for t in ids))
    L = top["ids"].shape[0]
    has_next = pos < T - 1
    loss = r.lens[si, :, pos] if has_next else np.full(L, np.nan, np.float32)
    df = pd.DataFrame({"after block": list(range(L)),
                       "loss": loss.astype(np.float64),
                       "top prediction": [repr(decode(int(t))) for t in top["ids"][:, pos]],
                       "p": top["probs"][:, pos].astype(np.float64)})
    nxt = f"the next token is {strs[pos + 1]!r}" if has_next else "the last token: no next one"
    st.caption(f"Each block's output at position {labels[pos]} through the final LayerNorm "
               f"and the unembedding, at step {step}: the loss on the next token ({nxt}) "
               f"and the top prediction. The last block's is the model's own output.")
    st.dataframe(df, hide_index=True, key="prompt_lens")


def _across(url, rs, rd, r, snaps, strs, labels, hook, neuron, layer, head, pat, T,
            fig_layout) -> None:
    st.subheader("Across training")
    xs = [str(int(s)) for s in r.steps]
    st.caption(f"The same text through each of the {len(xs)} weight snapshots "
               f"(steps {', '.join(xs)}).")
    if T > 1:
        f = go.Figure(go.Heatmap(z=r.loss.T, x=xs, y=labels[1:], colorscale="Reds", zmin=0,
                                 colorbar=dict(title="loss")))
        fig_layout(f, "Per-token loss by step", 160 + 16 * T)
        f.update_xaxes(title="step", type="category")
        f.update_yaxes(title="token", autorange="reversed", type="category")
        st.plotly_chart(f, key="prompt_loss_steps")
    z = r[hook][:, :, neuron].T
    f = go.Figure(go.Heatmap(z=z, x=xs, y=labels, colorscale="RdBu_r", zmid=0,
                             colorbar=dict(title="act")))
    fig_layout(f, f"Neuron {neuron} of {hook} on this text by step", 160 + 16 * T)
    f.update_xaxes(title="step", type="category")
    f.update_yaxes(title="token", autorange="reversed", type="category")
    st.plotly_chart(f, key="prompt_neuron_steps")

    last = len(xs) - 1
    f = go.Figure(go.Heatmap(z=pat[last], x=labels, y=labels, colorscale="Blues", zmin=0,
                             zmax=1, colorbar=dict(title="attn")),
                  frames=[go.Frame(data=[go.Heatmap(z=pat[i])], name=x)
                          for i, x in enumerate(xs)])
    fig_layout(f, f"Layer {layer}, head {head} by step (slide the step)", 300 + 16 * T)
    f.update_layout(sliders=[dict(
        active=last, currentvalue=dict(prefix="step "), pad=dict(t=50),
        steps=[dict(label=x, method="animate",
                    args=[[x], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                    transition=dict(duration=0))]) for x in xs])])
    f.update_yaxes(autorange="reversed", title="query", type="category")
    f.update_xaxes(title="key", type="category")
    st.plotly_chart(f, key="prompt_attn_steps")

    st.markdown("**Induction on a repeated random-token prompt**")
    vocab, half, seed = induction_setup(rs)
    ids = _induction_ids(rs)
    try:
        with st.spinner(f"Running the repeated prompt through {len(snaps)} snapshots..."):
            ind = cached_induction(rd, tuple(snaps), tuple(ids), half)
    except UserError as e:
        st.warning(str(e))
        return
    st.caption(f"{half} random tokens (ids below {vocab}, seed {seed}: the capture's own "
               f"induction probe) then the same again. Induction score: attention from each "
               f"second-copy token to the token after its first occurrence; the second "
               f"copy's loss falls when a head does that.")
    st.button("Put this prompt in the text box", key="prompt_induction",
              on_click=_put_induction_prompt, args=(ids,))
    sc = ind["scores"]  # [S, L, H]
    f = make_subplots(specs=[[{"secondary_y": True}]])
    for li in range(sc.shape[1]):
        f.add_scatter(x=ind["steps"], y=sc[:, li].max(-1), mode="lines+markers",
                      name=f"layer {li} (best head)")
    f.add_scatter(x=ind["steps"], y=sc[:, layer, head], mode="lines", name=f"L{layer} H{head}",
                  line=dict(dash="dot"))
    f.add_scatter(x=ind["steps"], y=ind["first"], mode="lines+markers", name="first-copy loss",
                  secondary_y=True, line=dict(dash="dash", color="grey"))
    f.add_scatter(x=ind["steps"], y=ind["second"], mode="lines+markers",
                  name="second-copy loss", secondary_y=True, line=dict(color="red"))
    n = len(rs.steps())
    pc = DYN.cached_phase_change(url, n) if n and "induction" in rs.head_score_names else None
    if pc:
        f.add_vline(x=pc["step"], line_dash="dash", line_color="red")
        f.add_annotation(x=pc["step"], y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                         text=f"phase change (Dynamics, step {pc['step']})",
                         font=dict(color="red"))
    fig_layout(f, "Induction score and loss on the repeated prompt by step", 360)
    f.update_xaxes(title="step")
    f.update_yaxes(title="induction score", range=[0, 1], secondary_y=False)
    f.update_yaxes(title="loss (nats)", secondary_y=True)
    st.plotly_chart(f, key="prompt_induction_steps")

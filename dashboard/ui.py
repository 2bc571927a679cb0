"""Pieces every page uses: chart layout, the step slider, a few sentences and colours."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

EMPTY = ("No captures are committed in this store yet: the run is still starting. "
         "This page shows them as soon as the first capture is written.")


def no_full(rs, what: str) -> str:
    """The sentence for a page part that needs a full capture when the store has none."""
    n = len(rs.steps())
    return (f"No full capture is committed yet: {what} are kept at full captures only "
            f"(capture.full_every); this store has {n} summary capture{'' if n == 1 else 's'} "
            f"so far. This shows them as soon as the first full capture is written.")


def fig_layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    # The title sits at the foot of a 70 px top margin, just above the plot, and plotly's
    # toolbar (modebar) keeps the top 30 px: a long title on a narrow chart does not run
    # under the toolbar's icons.
    fig.update_layout(title=dict(text=title, x=0, xref="paper", xanchor="left", y=1,
                                 yref="paper", yanchor="bottom", pad=dict(b=8)),
                      height=height, margin=dict(l=40, r=10, t=70, b=30),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _slider_moved(key: str) -> None:
    """on_change of a step slider. A change that reaches the app in a fragment's run (the
    live poll, dashboard.state.watch) is not the user's: no step slider is inside a
    fragment, so it is the browser's value from when the poll was sent, which a full run
    of the script has since replaced (e.g. by a newer latest step). step_slider ignores
    it."""
    ctx = get_script_run_ctx()
    if ctx is not None and ctx.fragment_ids_this_run:
        st.session_state[f"_echo::{key}"] = True
    else:  # the user's move: it stands, whatever poll came before
        st.session_state.pop(f"_echo::{key}", None)


def step_slider(steps: np.ndarray, key: str, what: str = "captured") -> int:
    """A slider over `steps` (all captured steps, or only the full ones: `what` = "full"
    names them). The value lives in session state under `key` (and so in the URL, through
    dashboard.state). While the run trains, a slider at the latest step follows the new
    ones until a step is chosen (by the user, a link or a button); choosing the latest
    again follows again. The "rolled back" warning appears only when a step this session
    showed in this run's store has gone from it (a resume rolled it back); a step from a
    link or another run that does not fit falls back to the latest without a word."""
    opts = [int(s) for s in steps]
    ss = st.session_state
    seen_key, shown_key, follow_key = f"_seen::{key}", f"_shown::{key}", f"_follow::{key}"
    seen = ss.get(seen_key) or []  # the options of the last slider drawn
    shown = ss.get(shown_key)       # the step it showed (or was set to follow)
    noun = "full capture" if what == "full" else "captured step"
    if ss.pop(f"_echo::{key}", False) and shown is not None:
        ss[key] = shown
    cur = ss.get(key)
    if cur is not None and cur not in opts and cur in seen and opts:
        st.warning(f"Step {cur} is no longer captured (a resumed run rolled it back); "
                   f"showing step {opts[-1]}, the latest {noun}.")
    follow = ss.get(follow_key)
    if follow is None or cur != shown:  # a first slider, or a step chosen since the last
        follow = cur is None or cur == (seen[-1] if seen else opts[-1] if opts else None)
    if opts and (follow or cur not in opts):
        follow = True  # the latest: following, missing (first slider, a link's), gone
        if cur != opts[-1]:  # (set only when it moves: the browser's slider is reset)
            cur = ss[key] = ss[shown_key] = opts[-1]
    ss[follow_key] = follow
    if len(opts) == 1:
        ss[seen_key] = opts
        st.caption(f"Step {opts[0]} (the only {noun})")
        return opts[0]
    label = "Step (full captures)" if what == "full" else "Step (captured steps)"
    value = int(st.select_slider(label, options=opts, key=key, on_change=_slider_moved,
                                 args=(key,)))
    # recorded once the slider is drawn: a run stopped before it keeps the last ones
    ss[seen_key], ss[shown_key] = opts, value
    return value


def steps_text(steps, most: int = 200) -> str:
    steps = [int(s) for s in steps]
    return ", ".join(map(str, steps[:most])) + (" ..." if len(steps) > most else "")


def color(a: float, scale: float) -> str:
    """A token's background: orange for positive activations, blue for negative."""
    if not np.isfinite(a) or scale <= 0:
        return "transparent"
    x = float(np.clip(a / scale, -1, 1))
    return f"rgba(255,120,0,{x:.2f})" if x >= 0 else f"rgba(30,110,255,{-x:.2f})"


def keep_valid(key: str, options) -> None:
    """Drop a widget's session value (from the URL or another run) that is not among its
    options, so the widget opens at its default instead of failing."""
    if key in st.session_state and st.session_state[key] not in list(options):
        del st.session_state[key]

"""The run dashboard: `streamlit run dashboard/app.py [-- --run-dir RUN | -- --runs-root DIR]`.

Without arguments it lists the runs under `runs/` (or DASHBOARD_RUNS_ROOT); `--run-dir RUN`
(or DASHBOARD_RUN_DIR) opens one run. Pages: Training, Dynamics, Neurons, Attention, Prompt,
Store, one module each. Every page's view is in the URL (dashboard/state.py), e.g.
`?page=attention&run=tiny&layer=1&head=0&step=40` or
`?page=neurons&run=tiny&hook=blocks.1.mlp.hook_post&neuron=7&step=40`: a link or a copied
URL opens exactly that view. While the run trains, every page follows it on its own. It
reads the run's capture store lazily through `store.reader.RunStore`. Every capture holds
the summary tier (statistics, top-k, head scores, the logit lens, the probe loss); only full
captures hold activations, attention patterns and neuron logit effects, so the parts that
show those offer full steps only.
Imports store, streamlit, plotly, numpy, pandas and tiktoken only: never torch, so it
starts fast (the Prompt page, dashboard/prompt.py, imports torch when it is opened).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import attention, neurons, state, store_page, training  # noqa: E402
from dashboard import data as D  # noqa: E402
from dashboard import dynamics as DYN  # noqa: E402
from dashboard import prompt as PR  # noqa: E402
from dashboard import ui  # noqa: E402
from store.errors import CorruptStore, SchemaVersionError, StoreError, StoreNotFound  # noqa: E402

PAGES = ["Training", "Dynamics", "Neurons", "Attention", "Prompt", "Store"]


# ----------------------------------------------------------------------------- sidebar

def pick_page() -> str:
    ss = st.session_state
    if "page" not in ss:  # a new session: the URL's page
        qp = st.query_params.get("page", "training").capitalize()
        ss["page"] = qp if qp in PAGES else PAGES[0]
    return st.sidebar.radio("Page", PAGES, key="page")


class Picked(NamedTuple):
    """The sidebar's choice: the store's URL, its URL parameter ({"run": folder name} or
    {"store": typed URL}), and the URLs of the other listed runs still live (not finished,
    stopped or failed: their sidebar captions follow them too)."""
    url: str
    param: dict[str, str]
    others_live: list[str]


def pick_run(args: D.Args) -> Picked | None:
    """The sidebar's run picker, or None (with a message, and polling the runs root while
    the run a link names, or any run, is not there yet)."""
    sb = st.sidebar
    ss = st.session_state
    sb.title("GPT-2 capture")
    qp = st.query_params
    if "typed_url" not in ss and qp.get("store"):  # a new session on a typed store's URL
        ss["typed_url"] = qp["store"]
    typed = sb.text_input("Run folder, store path or fsspec URL",
                          placeholder="runs/tiny or s3://bucket/run/capture.zarr",
                          key="typed_url").strip()
    if typed:
        url = D.store_url(typed)
        sb.caption(D.summary_line(D.cached_summary(url, D.live_key(url))))
        return Picked(url, {"store": typed}, [])
    runs = [args.run_dir] if args.run_dir else D.find_runs(args.runs_root)

    def listed() -> tuple:
        return tuple(D.find_runs(args.runs_root))

    if not runs:
        st.info(f"No runs under {args.runs_root!r}: a run is a folder with a capture.zarr "
                f"store (train one with `python -m trainer`, or pass `-- --run-dir RUN` or "
                f"`-- --runs-root DIR`, or type a store URL in the sidebar). This page lists "
                f"a run as soon as its store is created.")
        state.watch(listed, listed(), True, "waiting for a run")
        return None
    names = [Path(r).name or r for r in runs]
    wanted = qp.get("run")
    if ss.get("run") is None and wanted in names:  # a new session on a link's run
        ss["run"] = names.index(wanted)
    if ss.get("run") not in range(len(runs)):
        ss.pop("run", None)
    # a link to a run whose store is not created yet (a run just launched): no run is
    # chosen until it is, or until one is picked here
    waiting = "run" not in ss and bool(wanted) and wanted not in names
    urls = [D.store_url(r) for r in runs]
    keys = [D.live_key(u) for u in urls]
    sums = [D.cached_summary(u, k) for u, k in zip(urls, keys)]
    i = sb.radio("Run", range(len(runs)), format_func=lambda j: names[j],
                 captions=[D.summary_line(s) for s in sums], key="run",
                 index=None if waiting else 0)
    if i is None:
        st.info(f"No run {wanted!r} under {args.runs_root!r} yet: this page opens it as soon "
                f"as its capture store is created (or pick a run in the sidebar).")
        state.watch(listed, listed(), True, f"waiting for run {wanted!r}")
        return None
    # (a store that cannot be read is not followed: it would be polled for ever)
    others = [u for j, (u, k) in enumerate(zip(urls, keys))
              if j != i and k[0] in ("created", "training")]
    return Picked(urls[i], {"run": names[i]}, others)


# ----------------------------------------------------------------------------- links

PAGE_FUNCS = {"Training": training.page,
              "Dynamics": lambda url, rs: DYN.page(url, rs, ui.fig_layout, ui.step_slider),
              "Neurons": neurons.page, "Attention": attention.page,
              "Prompt": lambda url, rs: PR.page(url, rs, ui.fig_layout, ui.color),
              "Store": store_page.page}


def apply_link(page: str, rs, take) -> None:
    """A new session's URL (a link, a shared view) sets the page's widgets, through the
    page module's own apply_link(rs, take); values the run's store does not have are
    ignored, so those widgets open at the run's defaults."""
    own = {"Neurons": neurons.apply_link, "Attention": attention.apply_link,
           "Prompt": PR.apply_link}.get(page)
    if own is not None:
        own(rs, take)
        return
    for name, (key, _) in state.VIEW.get(page, {}).items():
        v = take(name, lambda v: True)
        if v is not None:
            st.session_state[key] = v


def open_store(url: str):
    """The run's store, or None with the one sentence saying why it cannot be shown."""
    try:
        return D.get_store(url)
    except StoreNotFound as e:
        # a run just launched has no store for its first seconds: not an error
        st.info(f"No capture store here yet. {e} This page shows the run as soon as its "
                f"store is created.")
    except SchemaVersionError as e:
        when = "an older" if "older than this code" in str(e) else "a newer"
        st.error(f"This store was written by {when} version of the project. {e}")
    except CorruptStore as e:
        st.error(f"This store's metadata cannot be read. {e}")
    except StoreError as e:
        st.error(str(e))
    return None


def main() -> None:
    st.set_page_config(page_title="GPT-2 capture dashboard", layout="wide")
    args = D.parse_args()
    page = pick_page()
    picked = pick_run(args)
    if picked is None:
        return
    url, run, others = picked
    switched = state.switch_run(url)
    st.session_state["_run_param"] = run  # every link between pages carries the run

    def signature() -> tuple:
        # the run's (status, captures, snapshots), then the other live runs' (the sidebar)
        return (D.live_key(url), *(D.live_key(u) for u in others))

    # taken before the page is drawn: a change while it is drawn is caught by the next poll
    first = signature()
    now = first[0][0]  # the run's status, or "absent" while its store does not exist
    rs = open_store(url)
    if rs is None:
        # not there yet (a run still starting): poll until it is
        state.watch(signature, first, True, "waiting for this run's store")
        return
    try:
        state.seed(page, lambda p, take: apply_link(p, rs, take))
        PAGE_FUNCS[page](url, rs)
    except CorruptStore as e:
        st.error(f"This store's metadata cannot be read. {e}")
    except StoreError as e:
        st.warning(f"{e}")
    except Exception as e:  # noqa: BLE001 - a sentence, never a traceback
        st.error(f"Could not show this page: {type(e).__name__}: {e}")
    state.write_url(page, run, keep_url=not switched)
    live = now not in state.FINAL
    state.watch(signature, first, live or bool(others),
                "this page follows the run" if live else "the sidebar follows the runs "
                "still training")

main()

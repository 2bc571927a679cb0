"""Helpers for the store tests (no tests here): a small layout, capture data that is a known
function of the step (so any reader can verify what it sees), rank workers that run in
their own processes, and a way to start them; the training-dynamics captures; and the
check of a store against docs/store.md's table."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store.schema import FULL, SLOT_BLOCK, STATS, SUMMARY, Layout  # noqa: E402

if TYPE_CHECKING:
    from store.writer import StoreWriter

P, T, H, K = 4, 8, 2, 3
HOOKS = {"blocks.0.hook_resid_post": 16, "blocks.1.mlp.hook_post": 200}
ATTN = [0, 2]
A = 2


def layout(world: int = 2, source: str = "probe", max_steps: int = 20,
           hooks: dict | None = None, **kw) -> Layout:
    return Layout(n_seqs=P, seq_len=T,
                  act_hooks=dict(hooks or HOOKS), topk=K, attn_layers=list(ATTN), n_heads=H,
                  attn_seqs=A, max_steps=max_steps, world=world, source=source,
                  attrs={"model": {"n_layer": 3, "n_embd": 16}, "run": {"seed": 1}},
                  probe_tokens=probe() if source == "probe" else None, **kw)


# Training dynamics: 3 layers of head scores and lens, logit effects of MLP layers 0 and 2.
DYNAMICS = dict(n_layers=3, head_scores=["entropy", "prev_token", "duplicate", "induction"],
                logit_lens=True, repeated_tokens=np.tile(np.arange(5, dtype=np.int32), (2, 2)),
                dla_layers=[0, 2], d_mlp=200, dla_k=4)


def probe() -> np.ndarray:
    return (np.arange(P * T).reshape(P, T) * 7 % 50257).astype(np.int32)


# ----------------------------------------------------------------------------- data = f(step)

def acts(step: int, hook: str, seqs: range) -> np.ndarray:
    D = HOOKS[hook]
    h = sorted(HOOKS).index(hook)
    s = np.asarray(list(seqs))[:, None, None]
    v = (step * 31 + h * 7 + s * 3 + np.arange(T)[None, :, None] * 5
         + np.arange(D)[None, None, :]) % 97 - 48
    return (v / 8).astype(np.float16)  # multiples of 1/8 within +-6: exact in float16


def tokens(step: int, seqs: range) -> np.ndarray:
    s = np.asarray(list(seqs))[:, None]
    return ((step * 13 + s * 101 + np.arange(T)[None, :]) % 50257).astype(np.int32)


def stats(step: int, hook: str) -> dict[str, np.ndarray]:
    D = HOOKS[hook]
    return {st: (step + i * 0.25 + np.arange(D) / 8).astype(np.float32)
            for i, st in enumerate(STATS)}


def topk(step: int, hook: str) -> tuple[np.ndarray, np.ndarray]:
    D = HOOKS[hook]
    v = (step + np.arange(D)[:, None] - np.arange(K)[None, :]).astype(np.float32)
    i = ((np.arange(D)[:, None] * K + np.arange(K)[None, :] + step) % (P * T)).astype(np.int32)
    return v, i


def attn(step: int, layer: int, seq: int, ta: int = T) -> np.ndarray:
    """The pattern [H, ta, ta]: the first ta query and key positions of the whole one."""
    v = (step + layer * 3 + seq + np.arange(H)[:, None, None] + np.arange(T)[None, :, None]
         + np.zeros((1, 1, T))) % 11
    return (np.tril(v) / 16).astype(np.float16)[:, :ta, :ta]


def token_loss(step: int) -> np.ndarray:
    """[P, T] float32, NaN at position 0 as the capture writes it."""
    v = (step % 7 + np.arange(P)[:, None] + np.arange(T)[None, :] / 4).astype(np.float32)
    v[:, 0] = np.nan
    return v


def icl(step: int) -> float:
    return float(np.float32(-0.125 * step))


def loss(step: int) -> float:
    return float(np.float32(10.0 / (step + 1)))


# ----------------------------------------------------------------------------- writing

def write_part(w, slot: int, step: int, rank: int, world: int, *, done: bool = True,
               pause: float = 0.0, full: bool = True) -> None:
    """One rank's part of capture `slot`, as the capture writer does it: the summary tier,
    and with `full` the activations and attention too. The slot must be reserved."""
    n = P // world
    seqs = range(rank * n, (rank + 1) * n)
    lay = w.layout
    w.write_tokens(slot, seqs.start, tokens(step, seqs))
    if full:
        for hook in lay.act_hooks:
            w.write_acts(hook, slot, seqs.start, acts(step, hook, seqs))
            if pause:
                time.sleep(pause)
        for layer in lay.stored_attn_layers:
            for s in seqs:
                if s < lay.attn_seqs:
                    w.write_attn(layer, slot, s, attn(step, layer, s, lay.attn_len))
    if rank == 0:
        for hook in lay.stat_hooks:
            w.write_stats(hook, slot, stats(step, hook))
            w.write_topk(hook, slot, *topk(step, hook))
        if lay.token_loss:
            w.write_token_loss(slot, token_loss(step), icl(step))
    if done:
        w.mark_done(slot, rank)


def append(ws: list, slot: int, step: int, *, full: bool = True) -> None:
    """One whole capture by the writers `ws` (rank r = ws[r]): reserve, write, commit."""
    ws[0].reserve(slot)
    for r, w in enumerate(ws):
        write_part(w, slot, step, r, len(ws), full=full)
    ws[0].commit(slot, step, SUMMARY | FULL if full else SUMMARY)


def rank_worker(url: str, rank: int, world: int, captures: list, ready: str) -> None:
    """A rank process: wait for the store, write its part of every (slot, step) capture and
    mark it done; rank 0 reserves each slot first and says so with the file READY.<slot>
    (the trainer's collective after reserve), the other ranks wait for it; rank 0 commits
    each capture once every rank marked it."""
    from store.writer import StoreWriter

    def wait(path: str) -> None:
        t0 = time.monotonic()
        while not Path(path).exists():
            if time.monotonic() - t0 > 30:
                raise TimeoutError(f"{path} never appeared")
            time.sleep(0.005)

    wait(ready)  # rank 0's create_or_open finished
    w = StoreWriter.open(url, durable=False)
    for slot, step in captures:
        if rank == 0:
            w.reserve(slot)
            Path(f"{ready}.{slot}").touch()
        else:
            wait(f"{ready}.{slot}")
        write_part(w, slot, step, rank, world)
        if rank == 0:
            while not w.all_done(slot):
                time.sleep(0.005)
            w.commit(slot, step)
    w.close()


def run_py(code: str, **popen) -> subprocess.Popen:
    """A fresh interpreter running `code` with the project and this folder importable."""
    prelude = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", prelude + code], env=env, text=True,
                            **popen)


def check_capture(rs, step: int, full: bool = True) -> None:
    """Everything RunStore returns for a committed `step` equals what was written; a
    summary-only capture (full=False) has no activations or attention to read."""
    from store.errors import StoreError

    for hook in rs.stat_hooks:
        at = rs.stats_at(hook, step)
        for st, v in stats(step, hook).items():
            np.testing.assert_array_equal(at[st], v)
        v, i = topk(step, hook)
        val, seq, pos = rs.topk(hook, step, 3)
        np.testing.assert_array_equal(val, v[3])
        np.testing.assert_array_equal(seq * T + pos, i[3])
    np.testing.assert_array_equal(rs.tokens(step), tokens(step, range(P)))
    if rs.has_token_loss:
        np.testing.assert_array_equal(rs.token_loss(step), token_loss(step))
    for hook in rs.act_hooks:
        if not full:
            try:
                rs.activations(hook, step)
            except StoreError as e:
                assert "summary capture only" in str(e), e
                continue
            raise AssertionError(f"step {step} is summary-only, yet has activations")
        np.testing.assert_array_equal(rs.activations(hook, step), acts(step, hook, range(P)))
        np.testing.assert_array_equal(rs.activations(hook, step, 1), acts(step, hook, [1])[0])
    if not full:
        return
    for layer in rs.attn_layers:
        for s in range(rs.attn_seqs):
            want = attn(step, layer, s, rs.attn_len)
            np.testing.assert_array_equal(rs.attention(layer, step, s), want)
            np.testing.assert_array_equal(rs.attention(layer, step, s, head=1), want[1])


# ----------------------------------------------------------------------------- dynamics

def scores(step: int) -> dict[str, np.ndarray]:
    """Each of DYNAMICS' head scores at `step`: [n_layers, H] float32."""
    L = DYNAMICS["n_layers"]
    base = np.arange(L * H, dtype=np.float32).reshape(L, H) / 10
    return {name: base + step + i for i, name in enumerate(DYNAMICS["head_scores"])}


def effects(step: int, layer: int):
    """An MLP layer's neuron logit effects at `step`: top tokens, top values, bottom tokens,
    bottom values, each [d_mlp, dla_k]."""
    m, k = DYNAMICS["d_mlp"], DYNAMICS["dla_k"]
    tok = (np.arange(m * k).reshape(m, k) * 7 + step + layer) % 50257
    val = np.linspace(1, -1, m * k, dtype=np.float32).reshape(m, k) + step
    return tok.astype(np.int32), val, (tok + 1).astype(np.int32), -val


def write_capture(w: StoreWriter, slot: int, step: int, commit: bool = True,
                  full: bool = True) -> None:
    """One capture by rank 0's writer playing both ranks; the logit effects are full-tier."""
    w.reserve(slot)
    for rank in range(2):
        write_part(w, slot, step, rank, 2, full=full)
    w.write_head_scores(slot, scores(step))
    w.write_lens(slot, np.array([3.0, 2.0, 1.0], np.float32) + step)
    if full:
        for layer in DYNAMICS["dla_layers"]:
            w.write_dla(layer, slot, *effects(step, layer))
    if commit:
        w.commit(slot, step, SUMMARY | FULL if full else SUMMARY)


def dump(obj) -> str:
    return json.dumps(obj)


# ----------------------------------------------------------------------------- docs/store.md

DOC = ROOT / "docs" / "store.md"


def doc_table() -> list[dict]:
    text = DOC.read_text()
    section = text.split("## Arrays", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        path, dtype, shape, chunks, fill, codecs, writer, tier, dims = cells
        rows.append(dict(path=path.strip("`"), dtype=dtype, shape=shape, chunks=chunks,
                         fill=fill, codecs=[c.strip() for c in codecs.split(",")],
                         writer=writer, tier="" if tier == "-" else tier,
                         dims=[d.strip() for d in dims.split(",")]))
    return rows


def doc_stats() -> list[str]:
    line = next(x for x in DOC.read_text().splitlines() if x.startswith("- `<stat>`"))
    return re.findall(r"`([a-z_]+)`", line.split(":", 1)[1].split("(")[0])


def expected_arrays(lay, C: int = SLOT_BLOCK) -> dict[str, dict]:
    """The doc's table expanded for one layout: path -> row with concrete shape/chunks."""
    R, N = (0, 0) if lay.repeated_tokens is None else np.asarray(lay.repeated_tokens).shape
    sym = dict(C=C, P=lay.n_seqs, T=lay.seq_len, W=lay.world, k=lay.topk, A=lay.attn_seqs,
               H=lay.n_heads, Ta=lay.attn_len, S=lay.max_steps, L=lay.n_layers, R=R, N=N,
               M=lay.d_mlp, K=lay.dla_k, Ar=lay.repeat_attn_seqs, Na=lay.repeat_attn_len,
               min=min)
    optional = {"probe/tokens": lay.source == "probe",
                "probe/repeated": lay.repeated_tokens is not None,
                "lens/loss": lay.logit_lens, "loss/token": lay.token_loss,
                "loss/icl": lay.token_loss, "attn_repeated/<layer>": lay.repeat_attn_seqs > 0}
    out = {}
    for row in doc_table():
        if not optional.get(row["path"], True):
            continue
        hooks = [(None, None)]
        if "<hook>" in row["path"]:
            hooks = [("<hook>", h) for h in lay.act_hooks.items()]
        elif "<stat_hook>" in row["path"]:
            hooks = [("<stat_hook>", h) for h in lay.stat_hooks.items()]
        stats = doc_stats() if "<stat>" in row["path"] else [None]
        layers = lay.stored_attn_layers if "<layer>" in row["path"] else [None]
        score_names = lay.head_scores if "<score>" in row["path"] else [None]
        mlps = lay.dla_layers if "<mlp_layer>" in row["path"] else [None]
        for place, hook in hooks:
            for st, layer, score, mlp in itertools.product(stats, layers, score_names, mlps):
                path = row["path"]
                if place:
                    path = path.replace(place, hook[0])
                path = path.replace("<stat>", str(st)).replace("<layer>", str(layer)).replace(
                    "<score>", str(score)).replace("<mlp_layer>", str(mlp))
                env = dict(sym, D=hook[1] if place else None)
                out[path] = dict(row, shape=tuple(eval(row["shape"].replace("[", "(")
                                                       .replace("]", ",)"), {}, env)),
                                 chunks=tuple(eval(row["chunks"], {}, env)))
    return out


def all_arrays(g: zarr.Group) -> dict[str, zarr.Array]:
    return {path: a for path, a in g.members(max_depth=None) if isinstance(a, zarr.Array)}


def check_against_doc(url, lay, C: int = SLOT_BLOCK) -> None:
    """The arrays of the store at `url` are exactly the doc table's for `lay`, as plain zarr
    and their zarr.json files show them; each row's tier is the schema's."""
    g = zarr.open_group(str(url), mode="r")
    want = expected_arrays(lay, C)
    have = all_arrays(g)
    assert sorted(have) == sorted(want)
    tiers = {spec.path: spec.tier for spec in lay.array_specs(C)}
    assert sorted(tiers) == sorted(want)
    for path, row in want.items():
        a = have[path]
        assert str(a.dtype) == row["dtype"], path
        assert a.shape == row["shape"], path
        assert a.chunks == row["chunks"], path
        assert tiers[path] == row["tier"], path
        fill = float(row["fill"]) if row["fill"] == "NaN" else int(row["fill"])
        if isinstance(fill, float) and math.isnan(fill):
            assert np.isnan(a.fill_value), path
        else:
            assert a.fill_value == fill, path
        meta = json.loads((url / path / "zarr.json").read_text())
        codecs = [c["name"] + (f"({c['configuration']['level']})" if c["name"] == "zstd"
                               else "") for c in meta["codecs"]]
        assert codecs == row["codecs"], path
        if meta["codecs"][0]["name"] == "bytes" and a.dtype.itemsize > 1:
            assert meta["codecs"][0]["configuration"]["endian"] == "little"
        assert meta["chunk_key_encoding"] == {"name": "default",
                                              "configuration": {"separator": "."}}
        assert meta["dimension_names"] == row["dims"], path
        assert a.attrs["meaning"] and a.attrs["written_by"]


# A writer process (two ranks' writers) and a reader process polling the same store: the
# reader must only ever see complete captures. Filled in with str.format: url, caps [(slot,
# step, full)], max_steps, flag (a file the reader makes once it has the store open: the
# writer starts then), newest (captures checked in full per poll), verify_all (every
# capture checked in full at the end, else the last), pause (seconds between polls).
LIVE_WRITER = """
import os, time, numpy as np, store_util as u
from store.schema import FULL, SUMMARY
from store.writer import StoreWriter
url, caps, max_steps, flag = {url!r}, {caps!r}, {max_steps!r}, {flag!r}
w0 = StoreWriter.create_or_open(url, u.layout(max_steps=max_steps))
w1 = StoreWriter.open(url)
w0.set_status("training")
t0 = time.monotonic()
while not os.path.exists(flag) and time.monotonic() - t0 < 30:
    time.sleep(0.005)               # the reader has the store open: captures start now
for slot, step, full in caps:
    w0.reserve(slot)                # grows every array at slot 1024, the reader polling
    for rank, w in enumerate((w0, w1)):
        u.write_part(w, slot, step, rank, 2, pause=0.004, full=full)  # readers poll mid-capture
    while not w0.all_done(slot):
        time.sleep(0.001)
    w0.commit(slot, step, SUMMARY | FULL if full else SUMMARY)
    w0.write_metrics("train", np.arange(max(1, step - 2), step + 1),
                     {{"loss": np.array([u.loss(s) for s in range(max(1, step - 2), step + 1)],
                                        np.float32)}})
w0.set_status("finished")
"""

LIVE_READER = """
import json, time, traceback, numpy as np, store_util as u
from store.reader import RunStore
from store.errors import StoreNotFound
url, caps, flag = {url!r}, {caps!r}, {flag!r}
full_of = {{step: full for _, step, full in caps}}
t0 = time.monotonic()
while True:
    try:
        rs = RunStore(url)
        open(flag, "w").close()
        break
    except StoreNotFound:
        time.sleep(0.005)
polls, verified, seen, errors, counts, last = 0, set(), set(), [], [], None
def verify(s):
    assert rs.tiers()[s] == (["summary", "full"] if full_of[s] else ["summary"])
    u.check_capture(rs, s, full_of[s])
    verified.add(s)
while time.monotonic() - t0 < 300:  # a bound for a hang only: it ends at "finished"
    try:
        done = rs.status == "finished"
        steps = rs.steps().tolist()
        polls += 1
        counts.append(len(steps))
        assert steps == sorted(steps) and set(steps) <= set(full_of)
        new = [s for s in steps if s not in verified]
        for s in new[-{newest}:]:  # the newest: most likely to race the writer
            verify(s)
        if steps:
            st, v = rs.stat("blocks.0.hook_resid_post", "mean", neuron=2)
            assert st.tolist()[:len(steps)] == steps   # a commit may land between reads
            assert v.tolist() == [u.stats(s, "blocks.0.hook_resid_post")["mean"][2]
                                  for s in st.tolist()]
            full = rs.steps("full").tolist()
            assert set(full) <= {{s for s in full_of if full_of[s]}}
        m = rs.metrics("train")
        assert np.array_equal(m["loss"], [u.loss(s) for s in m["step"]])
        if done:
            for s in (steps if {verify_all} else steps[-1:]):
                if s not in verified:
                    verify(s)
            last = int(m["step"][-1])
            break
        time.sleep({pause})         # a remote store serves both processes: leave it room
    except Exception:
        errors.append(traceback.format_exc(limit=3))
        if len(errors) > 3:
            break
print(json.dumps(dict(polls=polls, verified=sorted(verified), errors=errors,
                      distinct=len(set(counts)), final=steps, last_metric=last)))
"""

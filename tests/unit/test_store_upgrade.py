"""`python -m store.upgrade`: a schema-1 store converted in place to schema 2 reads back
every value through RunStore, matches docs/store.md's table, and takes new captures; a
conversion cut off anywhere finishes when run again; stores it cannot convert get one line
and exit status 2. The schema-1 stores are built by hand with plain zarr (what schema 1's
store/schema.py made) and, where git has it, written by the schema-1 code itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import store_util as u
from store_util import check_against_doc, effects, scores, write_capture
from store import upgrade
from store.errors import SchemaVersionError
from store.reader import RunStore
from store.schema import METRICS, STATS
from store.writer import StoreWriter

V1_COMMIT = "a90c00f15bc33209347cdd7f93b7bb104294af00"  # the last commit with schema 1
SCHED = [0, 5, 10, 15]
COMMITTED = [(0, 0), (1, 5), (3, 15)]  # (slot, step); slot 2 torn: one rank's part only
TORN = 2
ENC = {"name": "default", "configuration": {"separator": "."}}


# ----------------------------------------------------------------------------- schema 1

def v1_layout(sched: list[int], dynamics: bool) -> dict:
    d = dict(scheduled_steps=list(sched), n_seqs=u.P, seq_len=u.T, act_hooks=dict(u.HOOKS),
             topk=u.K, attn_layers=list(u.ATTN), n_heads=u.H, attn_seqs=u.A, max_steps=20,
             world=2, source="probe", metrics={k: list(v) for k, v in METRICS.items()},
             n_layers=0, head_scores=[], logit_lens=False, dla_layers=[], d_mlp=0, dla_k=0)
    if dynamics:
        d.update({k: v for k, v in u.DYNAMICS.items() if k != "repeated_tokens"})
    return d


def v1_arrays(d: dict) -> list[tuple]:
    """(path, shape, dtype, chunks, fill, zstd, dims) of every array schema 1 made."""
    C, P, T, W, k, A, H = (len(d["scheduled_steps"]), d["n_seqs"], d["seq_len"], d["world"],
                           d["topk"], d["attn_seqs"], d["n_heads"])
    cap = ("capture",)
    out = [("captures/scheduled_step", (C,), "int64", (1024,), -1, True, cap),
           ("captures/done", (C, W), "uint8", (1, 1), 0, False, ("capture", "rank")),
           ("probe/tokens", (P, T), "int32", (P, T), -1, True, ("seq", "pos")),
           ("inputs/tokens", (C, P, T), "int32", (1, 1, T), -1, True, cap + ("seq", "pos"))]
    for h, D in d["act_hooks"].items():
        out.append((f"acts/{h}", (C, P, T, D), "float16", (1, 1, T, D), np.nan, False,
                    cap + ("seq", "pos", "neuron")))
    for h, D in d["act_hooks"].items():
        out += [(f"stats/{h}/{st}", (C, D), "float32", (32, min(D, 128)), np.nan, True,
                 cap + ("neuron",)) for st in STATS]
    for h, D in d["act_hooks"].items():
        for name, dt, fill in (("value", "float32", np.nan), ("index", "int32", -1)):
            out.append((f"topk/{h}/{name}", (C, D, k), dt, (1, min(D, 128), k), fill, True,
                        cap + ("neuron", "k")))
    for layer in d["attn_layers"]:
        out.append((f"attn/{layer}", (C, A, H, T, T), "float16", (1, 1, H, T, T), np.nan, True,
                    cap + ("seq", "head", "query", "key")))
    L, M, K = d["n_layers"], d["d_mlp"], d["dla_k"]
    if d["head_scores"]:
        R, N = u.DYNAMICS["repeated_tokens"].shape
        out.append(("probe/repeated", (R, N), "int32", (R, N), -1, True, ("rseq", "rpos")))
    out += [(f"heads/{s}", (C, L, H), "float32", (32, L, H), np.nan, True,
             cap + ("layer", "head")) for s in d["head_scores"]]
    if d["logit_lens"]:
        out.append(("lens/loss", (C, L), "float32", (32, L), np.nan, True, cap + ("layer",)))
    for layer in d["dla_layers"]:
        for end in ("top", "bottom"):
            out.append((f"dla/{layer}/{end}_token", (C, M, K), "int32", (1, M, K), -1, True,
                        cap + ("neuron", "k")))
            out.append((f"dla/{layer}/{end}_value", (C, M, K), "float32", (1, M, K), np.nan,
                        True, cap + ("neuron", "k")))
    for split, names in d["metrics"].items():
        out += [(f"metrics/{split}/{n}", (d["max_steps"],), "float32", (4096,), np.nan, True,
                 ("step",)) for n in names]
    return out + [("captures/step", (C,), "int64", (1024,), -1, True, cap)]


def make_v1(url: str, sched=SCHED, committed=COMMITTED, dynamics=True) -> None:
    """A schema-1 store by hand with plain zarr, captures written as the schema-1 writer
    wrote them (every capture whole), a torn slot, and train metrics."""
    d = v1_layout(sched, dynamics)
    zarr.create_group(url, attributes={"model": {"n_layer": 3}, "run": {"seed": 1},
                                       "schema_version": 1, "layout": d, "status": "finished",
                                       "created_at": "then", "updated_at": "then"})
    arr = {}
    for path, shape, dt, chunks, fill, zstd, dims in v1_arrays(d):
        arr[path] = zarr.create_array(
            url, name=path, shape=shape, chunks=chunks, dtype=dt, fill_value=fill,
            compressors=zarr.codecs.ZstdCodec(level=1) if zstd else None,
            chunk_key_encoding=ENC, dimension_names=dims, zarr_format=3,
            attributes={"meaning": "v1", "written_by": "v1"},
            config={"write_empty_chunks": False})
    arr["captures/scheduled_step"][:] = np.asarray(sched, np.int64)
    arr["probe/tokens"][:] = u.probe()
    if dynamics:
        arr["probe/repeated"][:] = u.DYNAMICS["repeated_tokens"]
    for slot, step in committed:
        arr["inputs/tokens"][slot] = u.tokens(step, range(u.P))
        for h in u.HOOKS:
            arr[f"acts/{h}"][slot] = u.acts(step, h, range(u.P))
            for st, v in u.stats(step, h).items():
                arr[f"stats/{h}/{st}"][slot] = v
            arr[f"topk/{h}/value"][slot], arr[f"topk/{h}/index"][slot] = u.topk(step, h)
        for layer in u.ATTN:
            for s in range(u.A):
                arr[f"attn/{layer}"][slot, s] = u.attn(step, layer, s)
        if dynamics:
            for name, v in scores(step).items():
                arr[f"heads/{name}"][slot] = v
            arr["lens/loss"][slot] = np.array([3, 2, 1], np.float32) + step
            for layer in u.DYNAMICS["dla_layers"]:
                for end, v in zip(("top_token", "top_value", "bottom_token", "bottom_value"),
                                  effects(step, layer)):
                    arr[f"dla/{layer}/{end}"][slot] = v
        arr["captures/done"][slot] = 1
        arr["captures/step"][slot] = step
    if TORN < len(sched) and all(s != TORN for s, _ in committed):
        arr["inputs/tokens"][TORN, 2:] = u.tokens(99, range(2, 4))
        arr["captures/done"][TORN, 1] = 1
    arr["metrics/train/loss"][:] = np.array([u.loss(s) for s in range(1, 21)], np.float32)


def verify_upgraded(url: str, committed=COMMITTED, dynamics=True) -> None:
    """Every value of the schema-1 captures reads back through RunStore; the store is the
    doc table's; a resumed run appends to it."""
    rs = RunStore(url)
    steps = sorted(s for _, s in committed)
    assert rs.schema_version == 2 and rs.status == "finished"
    assert rs.steps().tolist() == steps and rs.steps("full").tolist() == steps
    assert rs.tiers() == {s: ["summary", "full"] for s in steps}
    assert rs.stat_hooks == rs.act_hooks == u.HOOKS and rs.attn_len == u.T
    assert not rs.has_token_loss and rs.attrs["model"] == {"n_layer": 3}
    for s in steps:
        u.check_capture(rs, s)
    np.testing.assert_array_equal(rs.probe_tokens(), u.probe())
    m = rs.metrics("train")
    assert m["step"].tolist() == list(range(1, 21))
    np.testing.assert_array_equal(m["loss"], [u.loss(s) for s in range(1, 21)])
    dyn = u.DYNAMICS if dynamics else {}
    lay = u.layout(**dyn)
    if dynamics:
        np.testing.assert_array_equal(rs.repeated_tokens(), u.DYNAMICS["repeated_tokens"])
        for name in u.DYNAMICS["head_scores"]:
            np.testing.assert_array_equal(rs.head_scores(name)[1],
                                          np.stack([scores(s)[name] for s in steps]))
        np.testing.assert_array_equal(rs.logit_lens()[1],
                                      [np.array([3, 2, 1]) + s for s in steps])
        for s in steps:
            got = rs.neuron_logits(2, s, 17)
            for key, v in zip(("top_token", "top_value", "bottom_token", "bottom_value"),
                              effects(s, 2)):
                np.testing.assert_array_equal(got[key], v[17])
    C = zarr.open_array(url, path="captures/step", mode="r").shape[0]
    check_against_doc(Path(url), lay, C)
    g = zarr.open_group(url, mode="r")
    assert "scheduled_steps" not in g.attrs["layout"] and "scheduled_step" not in g["captures"]
    assert lay.to_json() == g.attrs["layout"]
    # a resumed run on the converted store: rollback, then append at next_slot
    w = StoreWriter.create_or_open(url, lay)
    last = max(s for _, s in committed)
    assert w.rollback_after(last) == [] and w.next_slot() == max(c for c, _ in committed) + 1
    slot = w.next_slot()
    if dynamics:
        write_capture(w, slot, last + 1)
    else:
        u.append([w, StoreWriter.open(url)], slot, last + 1)
    assert rs.steps().tolist() == steps + [last + 1]
    u.check_capture(rs, last + 1)


def _files(url: str) -> dict[str, bytes]:
    return {str(p.relative_to(url)): p.read_bytes() for p in Path(url).rglob("*")
            if p.is_file()}


# ----------------------------------------------------------------------------- tests

def test_upgrade_converts_a_v1_store_in_place(tmp_path, capsys):
    url = str(tmp_path / "capture.zarr")
    make_v1(url)
    with pytest.raises(SchemaVersionError, match=r"convert it in place with `python -m "
                                                 r"store.upgrade .*capture.zarr`"):
        RunStore(url)
    before = _files(url)
    assert upgrade.main([url, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would: " in out and "3 committed captures in 4 slots" in out
    assert "4 -> 1024 slots" in out and "delete captures/scheduled_step" in out
    assert _files(url) == before  # a dry run changes nothing
    assert upgrade.main([url]) == 0
    assert "converted to schema version 2" in capsys.readouterr().out
    g = zarr.open_group(url, mode="r")
    assert g["captures/tier"][:5].tolist() == [3, 3, 0, 3, 0]
    assert g["captures/step"][:5].tolist() == [0, 5, -1, 15, -1]
    assert g["captures/done"][TORN].tolist() == [0, 1]  # torn: rollback_after clears it
    verify_upgraded(url)
    assert StoreWriter.open(url).all_done(TORN) is False
    assert upgrade.main([url]) == 2  # converted already
    assert "already schema version 2: nothing to convert" in capsys.readouterr().err


def test_upgrade_grows_a_long_schedule_past_1024_slots(tmp_path):
    url = str(tmp_path / "long.zarr")
    sched = list(range(0, 2 * 1030, 2))
    committed = [(0, 0), (1000, 2000), (1029, 2058)]
    make_v1(url, sched, committed, dynamics=False)
    assert upgrade.upgrade(url, say=lambda line: None)
    assert zarr.open_array(url, path="acts/blocks.1.mlp.hook_post", mode="r").shape[0] == 2048
    verify_upgraded(url, committed, dynamics=False)


@pytest.mark.parametrize("cut", ["first_array", "mid_arrays", "root_write"])
def test_an_upgrade_cut_off_anywhere_finishes_when_run_again(tmp_path, monkeypatch, cut):
    url = str(tmp_path / "capture.zarr")
    make_v1(url)
    calls = []
    real = upgrade._set_meta

    def crash(*a):
        calls.append(1)
        if (cut == "first_array" and len(calls) == 1) or (cut == "mid_arrays" and
                                                          len(calls) == 12):
            raise RuntimeError("power cut")
        return real(*a)

    def crash_root(self, *a, **kw):
        raise RuntimeError("power cut")

    with monkeypatch.context() as mp:
        mp.setattr(upgrade, "_set_meta", crash)
        if cut == "root_write":
            mp.setattr(zarr.Group, "update_attributes", crash_root)
        with pytest.raises(RuntimeError, match="power cut"):
            upgrade.upgrade(url, say=lambda line: None)
    with pytest.raises(SchemaVersionError, match="schema version 1"):  # still version 1
        RunStore(url)
    if cut == "root_write":  # everything but the root write was done
        assert "scheduled_step" not in zarr.open_group(url, mode="r")["captures"]
    else:
        g = zarr.open_group(url, mode="r")
        assert g["captures/tier"].shape == (1024,) and g["captures/step"].shape == (4,)
    assert upgrade.main([url]) == 0
    verify_upgraded(url)


def test_stores_it_cannot_convert_get_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.zarr"
    r = subprocess.run([sys.executable, "-m", "store.upgrade", str(missing)], cwd=u.ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith(f"error: no capture store at {missing}")
    assert len(r.stderr.strip().splitlines()) == 1 and not missing.exists()

    v2 = str(tmp_path / "v2.zarr")
    StoreWriter.create_or_open(v2, u.layout())
    assert upgrade.main([v2]) == 2
    assert capsys.readouterr().err.strip() == (f"error: store {v2} is already schema "
                                               f"version 2: nothing to convert")

    newer = str(tmp_path / "v7.zarr")
    make_v1(newer, dynamics=False)
    g = zarr.open_group(newer, mode="r+")
    g.update_attributes({"schema_version": 7})
    assert upgrade.main([newer]) == 2
    assert "has schema version 7; this converts version 1 to 2 only" in capsys.readouterr().err

    broken = str(tmp_path / "broken.zarr")
    make_v1(broken, dynamics=False)
    shutil.rmtree(Path(broken) / "acts" / "blocks.1.mlp.hook_post")
    before = _files(broken)
    assert upgrade.main([broken]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: store {broken} is corrupt: array acts/blocks.1.mlp.hook_post "
                   f"is missing; nothing was changed")
    assert _files(broken) == before

    other = str(tmp_path / "other.zarr")
    zarr.create_group(other, attributes={"hello": 1})
    assert upgrade.main([other]) == 2
    assert "is not a capture store" in capsys.readouterr().err


# ----------------------------------------------------------------------------- genuine v1

V1_WRITER = """
import sys
sys.path[:0] = [{root!r}, {here!r}]
import numpy as np, store_util as u
for m in [m for m in sys.modules if m == "store" or m.startswith("store.")]:
    del sys.modules[m]
sys.path.insert(0, {old!r})
from store.schema import SCHEMA_VERSION, Layout
from store.writer import StoreWriter
assert SCHEMA_VERSION == 1 and "scheduled_steps" in Layout.__dataclass_fields__
lay = Layout(scheduled_steps={sched!r}, n_seqs=u.P, seq_len=u.T, act_hooks=u.HOOKS, topk=u.K,
             attn_layers=u.ATTN, n_heads=u.H, attn_seqs=u.A, max_steps=20, world=2,
             source="probe", attrs={{"model": {{"n_layer": 3}}, "run": {{"seed": 1}}}},
             probe_tokens=u.probe(), **u.DYNAMICS)
ws = [StoreWriter.create_or_open({url!r}, lay, durable=False)]
ws.append(StoreWriter.open({url!r}, durable=False))
for slot, step in {committed!r}:
    for rank, w in enumerate(ws):
        seqs = range(2 * rank, 2 * rank + 2)
        w.write_tokens(slot, seqs.start, u.tokens(step, seqs))
        for hook in u.HOOKS:
            w.write_acts(hook, slot, seqs.start, u.acts(step, hook, seqs))
        for layer in u.ATTN:
            for s in seqs:
                if s < u.A:
                    w.write_attn(layer, slot, s, u.attn(step, layer, s))
        if rank == 0:
            for hook in u.HOOKS:
                w.write_stats(hook, slot, u.stats(step, hook))
                w.write_topk(hook, slot, *u.topk(step, hook))
            w.write_head_scores(slot, u.scores(step))
            w.write_lens(slot, np.array([3, 2, 1], np.float32) + step)
            for layer in u.DYNAMICS["dla_layers"]:
                w.write_dla(layer, slot, *u.effects(step, layer))
        w.mark_done(slot, rank)
    ws[0].commit(slot, step)
ws[1].write_tokens({torn}, 2, u.tokens(99, range(2, 4)))
ws[1].mark_done({torn}, 1)
ws[0].write_metrics("train", np.arange(1, 21),
                    {{"loss": np.array([u.loss(s) for s in range(1, 21)], np.float32)}})
ws[0].set_status("finished")
print("ok")
"""


def _v1_code(tmp_path) -> Path:
    """Schema 1's store package from git, or skip."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(u.ROOT), "cat-file", "-e",
                                      f"{V1_COMMIT}:store/schema.py"],
                                     capture_output=True).returncode != 0:
        pytest.skip("schema 1's code is not in this checkout's git history")
    names = subprocess.run([git, "-C", str(u.ROOT), "ls-tree", "--name-only", V1_COMMIT,
                            "store/"], capture_output=True, text=True, check=True).stdout
    old = tmp_path / "v1code"
    (old / "store").mkdir(parents=True)
    for name in names.split():
        src = subprocess.run([git, "-C", str(u.ROOT), "show", f"{V1_COMMIT}:{name}"],
                             capture_output=True, check=True).stdout
        (old / name).write_bytes(src)
    return old


def _meta(url: str) -> dict:
    """Every node's zarr.json, less what differs between any two stores: the arrays'
    attributes (their wording) and the root's times and status."""
    out = {}
    for p in Path(url).rglob("zarr.json"):
        m = json.loads(p.read_text())
        if m["node_type"] == "array":
            m.pop("attributes", None)
        else:
            for k in ("created_at", "updated_at", "status"):
                m["attributes"].pop(k, None)
        out[str(p.parent.relative_to(url))] = m
    return out


def test_a_store_written_by_the_v1_code(tmp_path):
    """The schema-1 writer itself writes the store; the hand-made schema-1 store has the
    same metadata; both convert and read back."""
    old = _v1_code(tmp_path)
    url = str(tmp_path / "genuine.zarr")
    code = V1_WRITER.format(root=str(u.ROOT), here=str(u.HERE), old=str(old), sched=SCHED,
                            url=url, committed=COMMITTED, torn=TORN)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    hand = str(tmp_path / "hand.zarr")
    make_v1(hand)
    assert _meta(url) == _meta(hand)
    with pytest.raises(SchemaVersionError, match="store.upgrade"):
        RunStore(url)
    assert upgrade.main([url]) == 0
    verify_upgraded(url)

"""docs/store.md is the schema: a store written by StoreWriter holds exactly the arrays its
table lists, with those dtypes, shapes, chunks, fills, codecs and tiers (checked with plain
zarr-python, no project code on the reading side), also once grown past 1024 slots, and the
doc's plain-zarr example runs. The size budget (bytes_per_capture, bytes_fixed) against the
bytes a store writes. Also: the store package never imports torch."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import zarr

import test_store_util as u
from store.errors import StoreError
from store.schema import SLOT_BLOCK
from store.writer import StoreWriter

DOC = u.ROOT / "docs" / "store.md"


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
               M=lay.d_mlp, K=lay.dla_k, min=min)
    optional = {"probe/tokens": lay.source == "probe",
                "probe/repeated": lay.repeated_tokens is not None,
                "lens/loss": lay.logit_lens, "loss/token": lay.token_loss,
                "loss/icl": lay.token_loss}
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
        scores = lay.head_scores if "<score>" in row["path"] else [None]
        mlps = lay.dla_layers if "<mlp_layer>" in row["path"] else [None]
        for place, hook in hooks:
            for st, layer, score, mlp in itertools.product(stats, layers, scores, mlps):
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


def test_store_matches_the_doc_table(tmp_path):
    rows = doc_table()
    assert len(rows) >= 20 and doc_stats() == ["mean", "std", "min", "max", "frac_active"]
    assert [r["path"] for r in rows][-1] == "captures/step"  # created and grown last
    assert {r["tier"] for r in rows} == {"summary", "full", ""}
    more = {"blocks.0.hook_resid_post": 16, "blocks.2.hook_resid_post": 24}
    variants = (("probe", {}), ("train", {}),
                ("probe", dict(u.DYNAMICS, token_loss=True, attn_len=5, stat_hooks=more)))
    for i, (source, kw) in enumerate(variants):
        lay = u.layout(source=source, max_steps=5000, **kw)
        url = tmp_path / f"{i}.zarr"
        StoreWriter.create_or_open(str(url), lay)
        check_against_doc(url, lay)
        g = zarr.open_group(str(url), mode="r")
        attrs = dict(g.attrs)
        assert attrs["schema_version"] == 2 and attrs["status"] == "created"
        assert attrs["model"] == lay.attrs["model"] and attrs["run"] == lay.attrs["run"]
        assert set(attrs["layout"]) >= {"n_seqs", "seq_len", "act_hooks", "stat_hooks",
                                        "topk", "attn_layers", "n_heads", "attn_seqs",
                                        "attn_len", "token_loss", "max_steps", "world",
                                        "source", "metrics"}
        assert "scheduled_steps" not in attrs["layout"]
        assert attrs["created_at"] and attrs["updated_at"]
        assert g["captures/step"].shape == (SLOT_BLOCK,)
        assert (g["captures/step"][:] == -1).all() and (g["captures/tier"][:] == 0).all()
    # the third: statistics and activations of different hooks, attention cut to 5 positions
    assert g["attn/0"].shape == (SLOT_BLOCK, u.A, u.H, 5, 5)
    assert "stats/blocks.2.hook_resid_post/mean" in g and "acts/blocks.2.hook_resid_post" \
        not in g
    assert "acts/blocks.1.mlp.hook_post" in g and "topk/blocks.1.mlp.hook_post" not in g
    # grown past 1024 slots, the store is still the table's, with C = 2048
    w = StoreWriter.create_or_open(str(url), lay)
    w.reserve(SLOT_BLOCK)
    check_against_doc(url, lay, 2 * SLOT_BLOCK)


def test_the_docs_plain_zarr_example_runs(tmp_path):
    url = str(tmp_path / "capture.zarr")
    w0 = StoreWriter.create_or_open(url, u.layout())
    w1 = StoreWriter.open(url)
    u.append([w0, w1], 0, 0)
    u.append([w0, w1], 1, 5)
    u.append([w0, w1], 2, 7, full=False)  # the latest capture is summary-only
    w0.write_metrics("train", np.array([1, 2, 4]), {"loss": np.array([3, 2, 1], np.float32)})
    w0.write_snapshot(5, {"model.safetensors": b"weights", "config.json": b"{}"})
    text = DOC.read_text().split("## Reading it with plain zarr-python", 1)[1]
    code = text.split("```python", 1)[1].split("```", 1)[0]
    code = re.sub(r'^url = .*$', f"url = {url!r}", code, count=1, flags=re.M)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)  # plain zarr only: the example imports no store
    hook = "blocks.0.hook_resid_post"
    assert ns["hook"] == hook and ns["steps"].tolist() == [0, 5, 7]
    assert ns["full"].tolist() == [0, 1] and ns["c"] == 1
    np.testing.assert_array_equal(ns["x"], u.acts(5, hook, [0])[0])
    np.testing.assert_array_equal(ns["tok"], u.tokens(5, [0])[0])
    np.testing.assert_array_equal(ns["curve"],
                                  [u.stats(s, hook)["mean"][5] for s in (0, 5, 7)])
    assert ns["logged"].tolist() == [1, 2, 4]
    # the doc's word on the snapshot folder: plain zarr warns about it, and that is all
    g = zarr.open_group(url, mode="r")
    with pytest.warns(UserWarning, match="Object at snapshots is not recognized"):
        members = dict(g.members(max_depth=None))
    assert "snapshots" not in members and "acts/" + hook in members
    assert "Object at snapshots is not recognized" in DOC.read_text()


def test_budget_matches_the_bytes_a_store_writes(tmp_path):
    """bytes_per_capture / bytes_fixed against a hand count of the doc's table, and against
    the bytes a real store wrote for its uncompressed arrays."""
    hooks = {"blocks.0.hook_resid_post": 16}
    stat_hooks = {**hooks, "blocks.1.mlp.hook_post": 200}
    lay = u.layout(hooks=hooks, stat_hooks=stat_hooks, token_loss=True, attn_len=6,
                   max_steps=300, **u.DYNAMICS)
    P, T, W, k, A, H, Ta = u.P, u.T, 2, u.K, u.A, u.H, 6
    L, M, Kd = 3, 200, 4
    R, N = u.DYNAMICS["repeated_tokens"].shape
    summary = (1 + W + 8                       # captures/tier, done, step
               + P * T * 4                     # inputs/tokens
               + sum(5 * d * 4 + d * k * 8 for d in stat_hooks.values())
               + P * T * 4 + 4                 # loss/token, loss/icl
               + 4 * L * H * 4 + L * 4)        # heads (4 scores), lens
    full = (sum(P * T * d * 2 for d in hooks.values())
            + len(u.ATTN) * A * H * Ta * Ta * 2
            + len(u.DYNAMICS["dla_layers"]) * 2 * M * Kd * 8)
    assert lay.bytes_per_capture("summary") == summary
    assert lay.bytes_per_capture("full") == full
    assert lay.bytes_fixed() == P * T * 4 + R * N * 4 + 6 * 300 * 4
    assert lay.bytes_fixed(10_000) - lay.bytes_fixed(0) == 6 * 10_000 * 4
    with pytest.raises(StoreError, match="unknown tier"):
        lay.bytes_per_capture("huge")

    url = tmp_path / "b.zarr"
    w0 = StoreWriter.create_or_open(str(url), lay)
    w1 = StoreWriter.open(str(url))

    def on_disk(path: str) -> int:
        return sum(f.stat().st_size for f in (url / path).rglob("c.*"))

    specs = {s.path: s for s in lay.array_specs(1)}
    acts = [p for p in specs if p.startswith("acts/")]
    assert all(on_disk(p) == 0 for p in acts)  # capacity costs no bytes
    u.append([w0, w1], 0, 3, full=False)
    assert all(on_disk(p) == 0 for p in acts) and on_disk("captures/done") == W
    u.append([w0, w1], 1, 6)
    for p in acts:  # uncompressed: exactly the spec's bytes per full capture
        assert on_disk(p) == specs[p].nbytes == P * T * hooks[p[5:]] * 2, p
    assert on_disk("captures/done") == 2 * W == 2 * specs["captures/done"].nbytes
    assert sum(specs[p].nbytes for p in acts) <= lay.bytes_per_capture("full")


def test_store_imports_no_torch():
    code = ("import sys, store, store.reader, store.writer, store.schema, store.errors, "
            "store.snapshots, store.upgrade; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from store import RunStore, StoreWriter; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=u.ROOT, capture_output=True,
                       text=True, timeout=60, env={**__import__("os").environ,
                                                   "PYTHONPATH": str(u.ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

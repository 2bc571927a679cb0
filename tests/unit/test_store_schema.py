"""docs/store.md is the schema: a store written by StoreWriter holds exactly the arrays its
table lists, with those dtypes, shapes, chunks, fills, codecs and tiers (checked with plain
zarr-python, no project code on the reading side), also once grown past 1024 slots, and the
doc's plain-zarr example runs. The size budget (bytes_per_capture, bytes_fixed) against the
bytes a store writes. Also: the store package never imports torch."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import zarr

import store_util as u
from store_util import DOC, check_against_doc, doc_stats, doc_table
from store.errors import StoreError
from store.schema import SLOT_BLOCK
from store.writer import StoreWriter


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

"""capture.export: one captured step of a store written out as files, read back exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capture import export
from capture.export import main
from helpers import BPE, ROOT, env
from store.schema import FULL, SCHEMA_VERSION, SUMMARY, Layout
from store.writer import StoreWriter

P, T, WORLD = 4, 5, 2
HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.4.hook_resid_post": 6, "blocks.4.mlp.hook_post": 3}
STAT_ONLY = {"blocks.0.mlp.hook_post": 3}  # statistics at every capture, never activations
SLOTS = [0, 3, 6, 7, 9]  # the steps written into slots 0..4, in order
COMMITTED = [0, 3, 6, 7]  # step 9 is written in part and never committed
SUMMARY_ONLY = [7]  # a summary capture: statistics, no activations or attention
SNAPSHOTS = [3, 6]  # weight snapshots of a tiny GPT (SNAP_MODEL)
SNAP_MODEL = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)
SEEDS = "blocks.4.hook_resid_post"


def acts_of(hook: str, step: int) -> np.ndarray:
    """Known data [P, T, D]: different for every hook, step, sequence, position and neuron,
    and exactly representable in float16."""
    h = list(HOOKS).index(hook)
    D = HOOKS[hook]
    p, t, d = np.meshgrid(np.arange(P), np.arange(T), np.arange(D), indexing="ij")
    return (step * 8 + p * 2 + t * 0.25 + d * 0.125 - h * 3).astype(np.float16)


def tokens_of(step: int) -> np.ndarray:
    return (np.arange(P * T).reshape(P, T) * 7 + step * 11 + 50000).astype(np.int32)


def snap_model(step: int, **over):
    """The tiny GPT whose weights are the snapshot of `step` (seeded by the step)."""
    from trainer.config import ModelConfig
    from trainer.model import GPT

    torch.manual_seed(100 + step)
    return GPT(ModelConfig(**{**SNAP_MODEL, **over})).eval()


def snapshot_of(model, step: int, dtype: str = "bf16") -> dict[str, bytes]:
    """The files capture writes for a weight snapshot (one process)."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from capture.snapshot import snapshot_files

    info = SimpleNamespace(rank=0, world=1, distributed=False, is_main=True,
                           device=torch.device("cpu"))
    return snapshot_files(model, asdict(model.cfg), step, dtype, info)


def build_store(url: str, committed=COMMITTED, snapshots=SNAPSHOTS) -> None:
    layout = Layout(n_seqs=P, seq_len=T, act_hooks=HOOKS, stat_hooks={**HOOKS, **STAT_ONLY},
                    topk=2, attn_layers=[1], n_heads=2, attn_seqs=1, max_steps=9, world=WORLD,
                    source="probe", attrs={"model": {"n_layer": 5}},
                    probe_tokens=tokens_of(0))
    w = StoreWriter.create_or_open(url, layout)
    per = P // WORLD
    for slot, step in enumerate(SLOTS):
        full = step not in SUMMARY_ONLY
        w.reserve(slot)  # rank 0, before any rank writes the slot
        for rank in range(WORLD):
            lo = rank * per
            w.write_tokens(slot, lo, tokens_of(step)[lo:lo + per])
            if full:
                for hook in HOOKS:
                    a = acts_of(hook, step)
                    w.write_acts(hook, slot, lo, a[lo:lo + per])
                for j in range(lo, min(lo + per, 1)):
                    pat = np.full((2, T, T), 1 / T, np.float16)
                    w.write_attn(1, slot, j, pat)
            if rank == 0:
                for hook, D in {**HOOKS, **STAT_ONLY}.items():
                    a = (acts_of(hook, step) if hook in HOOKS else
                         np.ones((P, T, D), np.float16)).astype(np.float32).reshape(-1, D)
                    w.write_stats(hook, slot, {"mean": a.mean(0), "std": a.std(0),
                                               "min": a.min(0), "max": a.max(0),
                                               "frac_active": (a > 0).mean(0)})
                    w.write_topk(hook, slot, np.zeros((D, 2), np.float32),
                                 np.zeros((D, 2), np.int32))
            w.mark_done(slot, rank)
        if step in committed:
            assert w.all_done(slot)
            w.commit(slot, step, SUMMARY | FULL if full else SUMMARY)
    for step in snapshots:
        w.write_snapshot(step, snapshot_of(snap_model(step), step))
    w.close()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    build_store(str(run / "capture.zarr"))
    return run


@pytest.fixture
def run_dir(made, tmp_path) -> Path:
    """A private copy of the module's run, for tests that write exports or break the store."""
    run = tmp_path / "run"
    shutil.copytree(made, run)
    return run


def call(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def fails_with(rc: int, err: str, *msgs: str) -> str:
    assert rc == 2, (rc, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for m in msgs:
        assert m in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".stage-" in p.name)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("step", [0, 6])
def test_pt_round_trip(run_dir, capsys, step):
    rc, out, err = call(["--run-dir", run_dir, "--step", step], capsys)
    assert rc == 0, err
    d = run_dir / "exports" / f"step_{step}"
    for hook in HOOKS:
        obj = torch.load(d / f"{hook}.pt", weights_only=True)
        assert set(obj) == {"activations", "tokens", "hook", "step", "source"}
        assert obj["activations"].dtype == torch.float16
        assert torch.equal(obj["activations"], torch.from_numpy(acts_of(hook, step)))
        assert obj["tokens"].dtype == torch.int64
        assert torch.equal(obj["tokens"], torch.from_numpy(tokens_of(step)).long())
        assert (obj["hook"], obj["step"], obj["source"]) == (hook, step, "probe")
        assert str(d / f"{hook}.pt") in out
    assert leftovers(run_dir / "exports") == []


def test_npy_round_trip(run_dir, capsys):
    out = run_dir / "elsewhere"
    rc, _, err = call(["--run-dir", run_dir, "--step", 3, "--format", "npy", "--out", out],
                      capsys)
    assert rc == 0, err
    d = out / "step_3"
    tok = np.load(d / "tokens.npy")
    assert tok.dtype == np.int64 and np.array_equal(tok, tokens_of(3))
    for hook in HOOKS:
        a = np.load(d / f"{hook}.npy")
        assert a.dtype == np.float16 and a.shape == (P, T, HOOKS[hook])
        assert np.array_equal(a, acts_of(hook, 3))
    assert not (run_dir / "exports").exists()
    assert leftovers(out) == []


def test_safetensors_round_trip(run_dir, capsys):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    rc, _, err = call(["--store", run_dir / "capture.zarr", "--step", 3, "--format",
                       "safetensors", "--out", run_dir / "st"], capsys)
    assert rc == 0, err
    d = run_dir / "st" / "step_3"
    for hook in HOOKS:
        t = load_file(d / f"{hook}.safetensors")
        assert set(t) == {"activations", "tokens"}
        assert t["activations"].dtype == np.float16
        assert np.array_equal(t["activations"], acts_of(hook, 3))
        assert t["tokens"].dtype == np.int64 and np.array_equal(t["tokens"], tokens_of(3))
        with safe_open(d / f"{hook}.safetensors", framework="pt") as f:
            assert f.metadata() == {"hook": hook, "step": "3", "source": "probe"}
            assert torch.equal(f.get_tensor("activations"),
                               torch.from_numpy(acts_of(hook, 3)))
    assert leftovers(run_dir / "st") == []


@pytest.mark.parametrize("fmt", ["pt", "npy", "safetensors"])
def test_seeds_file(run_dir, capsys, fmt):
    rc, _, err = call(["--run-dir", run_dir, "--step", 6, "--format", fmt], capsys)
    assert rc == 0, err
    obj = torch.load(run_dir / "exports" / "act_block4_output_step_6.pt", weights_only=True)
    assert set(obj) == {"activations", "input_ids"}
    assert obj["activations"].shape == (P, T, HOOKS[SEEDS])
    assert torch.equal(obj["activations"], torch.from_numpy(acts_of(SEEDS, 6)))
    assert obj["input_ids"].dtype == torch.int64
    assert torch.equal(obj["input_ids"], torch.from_numpy(tokens_of(6)).long())


def test_hook_patterns_choose_files(run_dir, capsys):
    rc, _, err = call(["--run-dir", run_dir, "--step", 3, "--hook", "blocks.*.hook_resid_post"],
                      capsys)
    assert rc == 0, err
    d = run_dir / "exports" / "step_3"
    assert sorted(p.name for p in d.iterdir()) == ["blocks.0.hook_resid_post.pt",
                                                   "blocks.4.hook_resid_post.pt"]
    # repeated --hook: a name and a pattern; no seeds' file without the block-4 output
    shutil.rmtree(run_dir / "exports")
    rc, _, err = call(["--run-dir", run_dir, "--step", 3, "--hook", "blocks.4.mlp.*",
                       "--hook", "blocks.0.hook_resid_post", "--format", "npy"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (run_dir / "exports").rglob("*") if p.is_file()) == [
        "blocks.0.hook_resid_post.npy", "blocks.4.mlp.hook_post.npy", "tokens.npy"]


def test_reads_one_sequence_at_a_time(run_dir, capsys, monkeypatch):
    from store.reader import RunStore

    seen = []
    real = RunStore.activations

    def spy(self, hook, step, seq=None):
        seen.append(seq)
        return real(self, hook, step, seq=seq)

    monkeypatch.setattr(RunStore, "activations", spy)
    rc, _, err = call(["--run-dir", run_dir, "--step", 3], capsys)
    assert rc == 0, err
    assert sorted(seen) == sorted(list(range(P)) * len(HOOKS))  # never a whole [P, T, D]


def test_progress_bar_when_large(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(export, "PROGRESS_MIN_BYTES", 0)
    rc, _, err = call(["--run-dir", run_dir, "--step", 3], capsys)
    assert rc == 0, err
    assert f"{P * len(HOOKS)}/{P * len(HOOKS)}" in err  # hooks x sequences
    monkeypatch.setattr(export, "PROGRESS_MIN_BYTES", 1 << 40)
    rc, _, err = call(["--run-dir", run_dir, "--step", 3], capsys)
    assert rc == 0 and "/12" not in err


def test_interrupted_export_leaves_nothing(run_dir, capsys, monkeypatch):
    """An interruption in the middle of the second file's write: no file under that final
    name, no temp, and no step folder holding the first hook alone."""
    real = torch.save
    calls = []

    def flaky(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"half a file")
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky)
    rc, _, err = call(["--run-dir", run_dir, "--step", 3], capsys)
    assert rc == 130
    assert len(calls) == 2  # the first file was written whole, then removed with its folder
    assert not (run_dir / "exports").exists()


def test_failed_export_into_an_existing_folder_removes_only_its_own_files(run_dir, capsys):
    out = run_dir / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    chunks = list((run_dir / "capture.zarr" / "acts" / "blocks.4.hook_resid_post").glob("c*"))
    assert chunks
    for c in chunks:
        c.write_bytes(b"not a chunk")  # the second hook's data is unreadable
    rc, _, err = call(["--run-dir", run_dir, "--step", 3, "--out", out], capsys)
    fails_with(rc, err)
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt"]


def test_unwritable_out_is_named_as_such(made, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out, msg in ((tmp_path / "file" / "x", "is a file"),
                     (Path("/proc/no/such"), "cannot create")):
        rc, _, err = call(["--run-dir", made, "--step", 3, "--out", out], capsys)
        line = fails_with(rc, err, "--out", msg)
        assert "cannot read store" not in line


# ----------------------------------------------------------------------------- locating


def test_default_run_dir_is_the_latest(made, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    for name, t in (("old", 1_000_000), ("new", 2_000_000), ("newest_no_store", 3_000_000)):
        d = runs / name
        if name != "newest_no_store":
            shutil.copytree(made / "capture.zarr", d / "capture.zarr")
        else:
            d.mkdir(parents=True)
        os.utime(d, (t, t))
    monkeypatch.chdir(tmp_path)
    rc, out, err = call(["--step", 0, "--hook", "blocks.0.*"], capsys)
    assert rc == 0, err
    assert "using run dir runs/new" in err
    assert (runs / "new" / "exports" / "step_0" / "blocks.0.hook_resid_post.pt").exists()
    assert not (runs / "old" / "exports").exists()
    # with --store the default output folder is ./exports
    rc, _, err = call(["--store", runs / "old" / "capture.zarr", "--step", 0, "--hook",
                       "blocks.0.*", "--format", "npy"], capsys)
    assert rc == 0, err
    assert (tmp_path / "exports" / "step_0" / "blocks.0.hook_resid_post.npy").exists()


def test_store_as_fsspec_url(made, tmp_path, capsys):
    url = "file://" + str(made / "capture.zarr")
    rc, _, err = call(["--store", url, "--step", 6, "--hook", SEEDS, "--out", tmp_path], capsys)
    assert rc == 0, err
    a = torch.load(tmp_path / "step_6" / f"{SEEDS}.pt", weights_only=True)["activations"]
    assert torch.equal(a, torch.from_numpy(acts_of(SEEDS, 6)))


# ----------------------------------------------------------------------------- listing


def test_list(made, capsys):
    rc, out, err = call(["--list", "--run-dir", made], capsys)
    assert rc == 0, err
    assert "steps: 4 captured (3 full): 0F, 3F, 6F, 7\n" in out  # 7: summary only
    assert "snapshots: 3, 6 " in out
    for hook, D in HOOKS.items():
        assert any(hook in line and f"[{P}, {T}, {D}]" in line for line in out.splitlines())
    stat_line = [x for x in out.splitlines() if x.startswith("statistics only")]
    assert stat_line == ["statistics only (1): blocks.0.mlp.hook_post [3]"], out
    assert "attention: layers 1 (2 heads, 1 sequences" in out
    assert "source: probe" in out and "status:" in out
    assert not (made / "exports").exists()


def test_list_is_compact_for_many_steps():
    assert export._fmt_steps(np.arange(0, 5000, 10)) == "500 captured, first 0, last 4990"
    assert export._fmt_steps(np.array([1, 2])) == "2 captured: 1, 2"
    assert export._fmt_steps(np.array([], np.int64)).startswith("0 captured")
    # with the full captures: each marked F, compact past a dozen
    assert export._fmt_steps(np.array([0, 1, 20]), np.array([0, 1])) == \
        "3 captured (2 full): 0F, 1F, 20"
    steps = np.array([0, 1, 2, 4, 8, 16, 20, 32] + list(range(40, 5001, 20)))
    full = np.array([0, 1, 2, 4, 8, 16, 32] + list(range(1000, 5001, 1000)))
    assert export._fmt_steps(steps, full) == (
        f"{len(steps)} captured (12 full): 0F, 1F, 2F, 4F, 8F, 16F, 20, 32F, ..., 4960, "
        f"4980, 5000F")
    assert export._fmt_snapshots(list(range(0, 30001, 1000))) == \
        "31: 0, 1000, 2000, 3000, 4000, 5000, 6000, 7000, ..., 28000, 29000, 30000"
    assert export._fmt_snapshots([]).startswith("none")


def test_list_of_a_store_with_no_capture_yet(tmp_path, capsys):
    build_store(str(tmp_path / "capture.zarr"), committed=[])
    rc, out, err = call(["--list", "--store", tmp_path / "capture.zarr"], capsys)
    assert rc == 0, err
    assert "0 captured" in out
    rc, _, err = call(["--store", tmp_path / "capture.zarr", "--step", 0], capsys)
    fails_with(rc, err, "step 0 was not captured", "no committed captures")


# ----------------------------------------------------------------------------- bad inputs


def test_uncaptured_step_names_the_nearest(made, capsys):
    rc, _, err = call(["--run-dir", made, "--step", 4], capsys)
    fails_with(rc, err, "step 4 was not captured", "before: 3", "after: 6")
    rc, _, err = call(["--run-dir", made, "--step", 9], capsys)  # written, never committed
    line = fails_with(rc, err, "step 9 was not captured", "before: 7")
    assert "after" not in line
    assert not (made / "exports").exists()


@pytest.mark.parametrize("fmt", ["pt", "npy", "safetensors", "saelens"])
def test_summary_only_step_names_the_nearest_full(made, capsys, fmt):
    """A summary capture keeps no activations: every activation format refuses it, naming
    the nearest full captures (6 before it; none after)."""
    rc, _, err = call(["--run-dir", made, "--step", 7, "--format", fmt, "--hook", SEEDS],
                      capsys)
    line = fails_with(rc, err, "step 7 has a summary capture only", "before 6")
    assert "after" not in line
    assert not (made / "exports").exists()


def test_statistics_only_hook_is_named_so(made, capsys):
    rc, _, err = call(["--run-dir", made, "--step", 3, "--hook", "blocks.0.mlp.hook_post"],
                      capsys)
    fails_with(rc, err, "'blocks.0.mlp.hook_post' has statistics only", *HOOKS)
    # the default (every hook) exports the hooks with activations only
    rc, _, err = call(["--run-dir", made, "--step", 3, "--format", "npy", "--out",
                       made.parent / "all_hooks"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (made.parent / "all_hooks" / "step_3").iterdir()) == \
        sorted([f"{h}.npy" for h in HOOKS] + ["tokens.npy"])
    shutil.rmtree(made.parent / "all_hooks")


def test_unknown_hook_lists_stored(made, capsys):
    rc, _, err = call(["--run-dir", made, "--step", 3, "--hook", "blocks.9.hook_resid_post"],
                      capsys)
    fails_with(rc, err, "'blocks.9.hook_resid_post'", *HOOKS)
    rc, _, err = call(["--run-dir", made, "--step", 3, "--hook", "*.attn.*"], capsys)
    fails_with(rc, err, "'*.attn.*'", *HOOKS)


def test_missing_places(tmp_path, capsys, monkeypatch):
    rc, _, err = call(["--run-dir", tmp_path / "nope", "--step", 3], capsys)
    fails_with(rc, err, "run dir", "not found")
    rc, _, err = call(["--store", tmp_path / "nope.zarr", "--step", 3], capsys)
    fails_with(rc, err, "nope.zarr", "not found")
    (tmp_path / "bare").mkdir()
    rc, _, err = call(["--run-dir", tmp_path / "bare", "--step", 3], capsys)
    fails_with(rc, err, "has no capture store")
    rc, _, err = call(["--store", tmp_path / "bare", "--step", 3], capsys)  # not a store
    fails_with(rc, err)
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(["--step", 3], capsys)
    fails_with(rc, err, "--run-dir")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    rc, _, err = call(["--list"], capsys)
    fails_with(rc, err, "no run with a capture.zarr under runs")


def test_step_required_without_list(made, capsys):
    rc, _, err = call(["--run-dir", made], capsys)
    fails_with(rc, err, "--step N is required")
    rc, _, err = call(["--run-dir", made, "--step", 3, "--format", "csv"], capsys)
    fails_with(rc, err, "invalid choice: 'csv'")
    rc, _, err = call(["--run-dir", made, "--step", "three"], capsys)
    fails_with(rc, err, "--step")


def test_newer_schema_asks_for_upgrade(run_dir, capsys):
    root = run_dir / "capture.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["schema_version"] = SCHEMA_VERSION + 1
    root.write_text(json.dumps(meta))
    for argv in (["--step", 3], ["--list"]):
        rc, _, err = call(["--run-dir", run_dir, *argv], capsys)
        line = fails_with(rc, err, str(SCHEMA_VERSION + 1))
        assert "upgrade" in line.lower()
    assert not (run_dir / "exports").exists()


@pytest.mark.parametrize("node", ["acts/blocks.4.hook_resid_post", "inputs/tokens",
                                  "captures/step", ""])
def test_corrupt_metadata(run_dir, capsys, node):
    meta = run_dir / "capture.zarr" / node / "zarr.json"
    assert meta.exists()
    meta.write_bytes(b"\x00\xffnot json{{")
    rc, _, err = call(["--run-dir", run_dir, "--step", 3], capsys)
    fails_with(rc, err)
    assert leftovers(run_dir) == []
    assert not (run_dir / "exports").exists()  # a failed export leaves no folder behind


def test_cli_subprocess(made, tmp_path):
    """The module as the user runs it: one error line, exit 2; and a working export."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "capture.export", *map(str, args)],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)

    r = cli("--run-dir", made, "--step", 5)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: step 5 was not captured; nearest captured steps before: 3, after: 6 "
        "(--list shows all 4)"]
    r = cli("--run-dir", made, "--step", 7)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: step 7 has a summary capture only; its activations and attention are kept "
        "at full captures: nearest before 6"]
    r = cli("--run-dir", made, "--step", 0, "--format", "npy", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "step_0" / f"{SEEDS}.npy"), acts_of(SEEDS, 0))


# ----------------------------------------------------------------------------- weights (hf)


def bf16_rounded(model):
    """The model as a bf16 snapshot holds it, back in float32."""
    return model.to(torch.bfloat16).float().eval()


def test_load_snapshot_is_the_bf16_weights(made):
    from trainer.snapshots import load_snapshot

    model, cfg, step = load_snapshot(str(made / "capture.zarr"), 6)
    assert step == 6 and cfg.n_layer == SNAP_MODEL["n_layer"] and cfg.tie_embeddings
    assert model.lm_head.weight is model.wte.weight  # tied again (stored once)
    want = bf16_rounded(snap_model(6)).state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    # and not the other snapshot's
    other = bf16_rounded(snap_model(3)).state_dict()
    assert not torch.equal(got["wte.weight"], other["wte.weight"])


@pytest.mark.parametrize("over,dtype", [({"tie_embeddings": False}, "bf16"),
                                        ({"attn_only": True}, "fp16")])
def test_load_snapshot_of_other_shapes(tmp_path, over, dtype):
    """Untied (lm_head stored) and attention-only models load; fp16 snapshots too."""
    from trainer.snapshots import load_snapshot

    build_store(str(tmp_path / "s.zarr"), snapshots=[])
    m = snap_model(1, **over)
    w = StoreWriter.open(str(tmp_path / "s.zarr"))
    w.write_snapshot(1, snapshot_of(m, 1, dtype))
    w.close()
    model, cfg, _ = load_snapshot(str(tmp_path / "s.zarr"), 1)
    assert (cfg.tie_embeddings, cfg.attn_only) == (m.cfg.tie_embeddings, m.cfg.attn_only)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    want = {k: v.to(dt).float() for k, v in m.state_dict().items()}
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if not cfg.tie_embeddings:
        assert not torch.equal(model.lm_head.weight, model.wte.weight)
    x = torch.randint(0, SNAP_MODEL["vocab_size"], (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(x), m.to(dt).float()(x), atol=1e-5)


def _hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.usefixtures("shared")
def test_hf_export_loads_in_transformers(run_dir, capsys):
    pytest.importorskip("transformers")
    out = run_dir / "hf6"
    rc, stdout, err = call(["--run-dir", run_dir, "--step", 6, "--format", "hf", "--out", out,
                            "--tokenizer-file", BPE], capsys)
    assert rc == 0, err
    assert stdout.strip().splitlines() == [str(out)]
    assert "exported the weights of step 6" in err and "no tokenizer" not in err
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(names)
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]  # the staging folder
    x = torch.randint(0, SNAP_MODEL["vocab_size"], (3, 8))
    with torch.no_grad():
        want = bf16_rounded(snap_model(6))(x)
    torch.testing.assert_close(_hf_logits(out, x), want, atol=1e-5, rtol=1e-5)
    # the default folder: RUN/exports/step_N/hf; exporting again replaces it whole
    for _ in range(2):
        rc, stdout, err = call(["--run-dir", run_dir, "--step", 3, "--format", "hf",
                                "--tokenizer-file", BPE], capsys)
        assert rc == 0, err
    default = run_dir / "exports" / "step_3" / "hf"
    assert stdout.strip() == str(default)
    with torch.no_grad():
        want = bf16_rounded(snap_model(3))(x)
    torch.testing.assert_close(_hf_logits(default, x), want, atol=1e-5, rtol=1e-5)


def test_hf_export_without_a_tokenizer_warns(run_dir, capsys, monkeypatch):
    """--store alone (no run config to find the BPE file) and no tiktoken download: the
    weights are exported anyway, with a one-line warning."""
    pytest.importorskip("transformers")
    import trainer.tokenizer
    from trainer.config import UserError as TrainerUserError

    def offline(bpe_file: str = ""):
        if not bpe_file:
            raise TrainerUserError("could not load the GPT-2 tokenizer from tiktoken (offline)")
        raise AssertionError("no BPE file was given")

    monkeypatch.setattr(trainer.tokenizer, "get_encoding", offline)
    out = run_dir / "weights_only"
    rc, _, err = call(["--store", run_dir / "capture.zarr", "--step", 3, "--format", "hf",
                       "--out", out], capsys)
    assert rc == 0, err
    warn = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warn) == 1 and "without tokenizer files" in warn[0], err
    assert "(no tokenizer files)" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
    x = torch.randint(0, SNAP_MODEL["vocab_size"], (2, 8))
    with torch.no_grad():
        want = bf16_rounded(snap_model(3))(x)
    torch.testing.assert_close(_hf_logits(out, x), want, atol=1e-5, rtol=1e-5)


def test_hf_export_bad_steps(made, capsys):
    pytest.importorskip("transformers")
    for step in (0, 7, 4):  # captured (full / summary) or not: no snapshot at any of them
        rc, _, err = call(["--run-dir", made, "--step", step, "--format", "hf", "--out",
                           made.parent / "never"], capsys)
        fails_with(rc, err, f"no weight snapshot at step {step}", "snapshot steps: 3, 6")
    rc, _, err = call(["--run-dir", made, "--step", 3, "--format", "hf", "--hook", SEEDS],
                      capsys)
    fails_with(rc, err, "--hook does not apply to --format hf")
    assert not (made.parent / "never").exists() and not (made / "exports").exists()


@pytest.mark.parametrize("over,msg", [({"attn_only": True}, "attention-only"),
                                      ({"tie_embeddings": False}, "tie_embeddings=false")])
def test_hf_export_refuses_models_gpt2_cannot_hold(tmp_path, capsys, over, msg):
    pytest.importorskip("transformers")
    build_store(str(tmp_path / "s.zarr"), snapshots=[])
    w = StoreWriter.open(str(tmp_path / "s.zarr"))
    w.write_snapshot(5, snapshot_of(snap_model(5, **over), 5))
    w.close()
    rc, _, err = call(["--store", tmp_path / "s.zarr", "--step", 5, "--format", "hf",
                       "--out", tmp_path / "hf"], capsys)
    fails_with(rc, err, msg)
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["truncate", "garble", "config"])
def test_hf_export_of_a_corrupt_snapshot(run_dir, capsys, damage):
    pytest.importorskip("transformers")
    snap = run_dir / "capture.zarr" / "snapshots" / "00000006"
    weights = snap / "model.safetensors"
    raw = weights.read_bytes()
    if damage == "truncate":  # the marker's size no longer holds
        weights.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble":  # the same size, an unreadable header
        weights.write_bytes(b"\xff" * 16 + raw[16:])
    else:
        cfg = snap / "config.json"
        cfg.write_bytes(b"{not json" + b" " * (len(cfg.read_bytes()) - 9))
    rc, _, err = call(["--run-dir", run_dir, "--step", 6, "--format", "hf", "--out",
                       run_dir / "hf"], capsys)
    fails_with(rc, err, "snapshot 6", "corrupt")
    assert not (run_dir / "hf").exists()
    # the other snapshot is untouched and still exports
    rc, _, err = call(["--run-dir", run_dir, "--step", 3, "--format", "hf", "--out",
                       run_dir / "hf"], capsys)
    assert rc == 0, err

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
from helpers import ROOT, env
from store.schema import SCHEMA_VERSION, Layout
from store.writer import StoreWriter

P, T, WORLD = 4, 5, 2
HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.4.hook_resid_post": 6, "blocks.4.mlp.hook_post": 3}
SCHEDULED = [0, 3, 6, 9]
COMMITTED = [0, 3, 6]  # step 9 is scheduled, written in part, and never committed
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


def build_store(url: str, committed=COMMITTED) -> None:
    layout = Layout(scheduled_steps=SCHEDULED, n_seqs=P, seq_len=T, act_hooks=HOOKS, topk=2,
                    attn_layers=[1], n_heads=2, attn_seqs=1, max_steps=9, world=WORLD,
                    source="probe", attrs={"model": {"n_layer": 5}},
                    probe_tokens=tokens_of(0))
    w = StoreWriter.create_or_open(url, layout)
    per = P // WORLD
    for slot, step in enumerate(SCHEDULED):
        for rank in range(WORLD):
            lo = rank * per
            w.write_tokens(slot, lo, tokens_of(step)[lo:lo + per])
            for hook in HOOKS:
                a = acts_of(hook, step)
                w.write_acts(hook, slot, lo, a[lo:lo + per])
            for j in range(lo, min(lo + per, 1)):
                pat = np.full((2, T, T), 1 / T, np.float16)
                w.write_attn(1, slot, j, pat)
            if rank == 0:
                for hook, D in HOOKS.items():
                    a = acts_of(hook, step).astype(np.float32).reshape(-1, D)
                    w.write_stats(hook, slot, {"mean": a.mean(0), "std": a.std(0),
                                               "min": a.min(0), "max": a.max(0),
                                               "frac_active": (a > 0).mean(0)})
                    w.write_topk(hook, slot, np.zeros((D, 2), np.float32),
                                 np.zeros((D, 2), np.int32))
            w.mark_done(slot, rank)
        if step in committed:
            assert w.all_done(slot)
            w.commit(slot, step)


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


def test_interrupted_export_leaves_no_partial_file(run_dir, capsys, monkeypatch):
    """A failure in the middle of a file's write: no file under that final name, no temp."""
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
    d = run_dir / "exports" / "step_3"
    assert [p.name for p in d.iterdir()] == ["blocks.0.hook_resid_post.pt"]  # the first only
    assert leftovers(run_dir / "exports") == []


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
    assert "steps: 3 captured: 0, 3, 6" in out
    for hook, D in HOOKS.items():
        assert any(hook in line and f"[{P}, {T}, {D}]" in line for line in out.splitlines())
    assert "attention: layers 1 (2 heads, 1 sequences" in out
    assert "source: probe" in out and "status:" in out
    assert not (made / "exports").exists()


def test_list_is_compact_for_many_steps():
    assert export._fmt_steps(np.arange(0, 5000, 10)) == "500 captured, first 0, last 4990"
    assert export._fmt_steps(np.array([1, 2])) == "2 captured: 1, 2"
    assert export._fmt_steps(np.array([], np.int64)).startswith("0 captured")


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
    rc, _, err = call(["--run-dir", made, "--step", 9], capsys)  # scheduled, never committed
    line = fails_with(rc, err, "step 9 was not captured", "before: 6")
    assert "after" not in line
    assert not (made / "exports").exists()


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
    if (run_dir / "exports").exists():  # what was written before the broken array is whole
        for p in (run_dir / "exports").rglob("*.pt"):
            torch.load(p, weights_only=True)


def test_cli_subprocess(made, tmp_path):
    """The module as the user runs it: one error line, exit 2; and a working export."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "capture.export", *map(str, args)],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)

    r = cli("--run-dir", made, "--step", 5)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: step 5 was not captured; nearest captured steps before: 3, after: 6 "
        "(--list shows all 3)"]
    r = cli("--run-dir", made, "--step", 0, "--format", "npy", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "step_0" / f"{SEEDS}.npy"), acts_of(SEEDS, 0))

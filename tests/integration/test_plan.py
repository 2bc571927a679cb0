"""The capture plan: `--plan` for GPT-2 124M fits the default budget; the plan's arithmetic
matches the bytes a real run wrote; a plan over budget is refused before anything is
written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import (TINY_ARGS, TINY_FULL, TINY_SNAPSHOTS, TINY_STEPS, ok, run_cli, run_clis,
                     train_args)
from store.reader import RunStore

pytestmark = pytest.mark.integration

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _total(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"total: ([0-9.]+) (B|KB|MB|GB|TB)", last)
    assert m, last
    return float(m.group(1)) * UNITS[m.group(2)]


def test_gpt2_plan_fits_50_gb_without_data():
    r, bad = run_clis(
        ["-m", "trainer", "--config", "configs/gpt2.toml", "--plan", "--world-size", "8"],
        ["-m", "trainer", "--config", "configs/gpt2.toml", "--plan", "--world-size", "0"])
    ok(r)
    assert _total(r.stdout) <= 50e9
    for tier in ("summary", "full", "snapshot"):
        assert re.search(rf"^  {tier} +[0-9,]+ ", r.stdout, re.M), r.stdout
    assert bad.returncode == 2 and \
        bad.stderr.strip() == "error: --world-size must be at least 1, got 0"


def _disk(path: Path) -> int:
    """Bytes of the chunk files under `path` (not the zarr.json metadata)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
               and p.name != "zarr.json")


def test_plan_matches_the_bytes_a_real_run_wrote(shakespeare_data, tiny_run):
    """The real run: conftest.py's tiny_run (helpers.TINY_ARGS: 8 steps, a 4 x 16 probe,
    summaries every 2 steps, snapshots every 3), which this test only reads."""
    from trainer import capture_setup
    from trainer.config import load_run_config

    run = tiny_run
    cfg = load_run_config(run)
    plan = {t.tier: t for t in capture_setup.capture_plan(cfg, 1).tiers}
    rs = RunStore(str(run / "capture.zarr"))
    tiers = rs.tiers()
    assert plan["summary"].steps == sorted(tiers) == TINY_STEPS == [0, 1, 2, 4, 6, 8]
    assert plan["full"].steps == [s for s, t in tiers.items() if "full" in t] == TINY_FULL
    assert plan["snapshot"].steps == rs.snapshot_steps() == TINY_SNAPSHOTS

    root = run / "capture.zarr"
    specs = {s.path: s for s in rs.layout.array_specs()}
    by_tier = {"summary": 0, "full": 0}
    for path, spec in specs.items():
        if spec.tier:
            by_tier[spec.tier] += _disk(root / path)
    n_sum, n_full = len(plan["summary"].steps), len(plan["full"].steps)
    # Activations are stored raw: their bytes on disk are exactly the plan's.
    acts = sum(_disk(root / "acts" / h) for h in rs.act_hooks)
    per_full_acts = sum(4 * 16 * D * 2 for D in rs.act_hooks.values())
    assert acts == per_full_acts * n_full
    # The rest is compressed: at most the plan's uncompressed bytes, and not nothing.
    assert 0 < by_tier["full"] <= plan["full"].per_capture * n_full
    assert 0 < by_tier["summary"] <= plan["summary"].per_capture * n_sum
    params = cfg.model.num_params()
    for s in rs.snapshot_steps():
        size = len(rs.snapshot_file(s))
        assert 2 * params <= size <= plan["snapshot"].per_capture
    # What the plan prints is the same arithmetic.
    r = ok(run_cli(["-m", "trainer", "--data", str(shakespeare_data), "--run-dir", str(run),
                    *TINY_ARGS, "--plan"]))
    total = sum(t.total for t in plan.values())
    assert abs(_total(r.stdout) - total) <= 0.06 * total


def test_a_plan_over_budget_is_refused_before_anything_is_written(shakespeare_data,
                                                                  tmp_path):
    run = tmp_path / "run"
    r, lots = run_clis(train_args(shakespeare_data, run, "--capture.budget=1MB", steps=8),
                       train_args(shakespeare_data, run, "--capture.budget=lots", steps=8))
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: the capture plan needs"), r.stderr
    assert "capture.budget" in lines[0] and "snapshot" in lines[0]
    assert not run.exists()
    r = lots
    assert r.returncode == 2 and "capture.budget must look like" in r.stderr
    assert "Traceback" not in r.stderr and not run.exists()

"""The dashboard's argument parsing, run discovery and token decoding (no training here),
and that it never imports torch or trainer (it must start fast)."""

from __future__ import annotations

import subprocess
import sys

from helpers import BPE, ROOT, env


def test_args_and_env():
    from dashboard.data import parse_args
    a = parse_args(["--", "--run-dir", "runs/a"], {})
    assert a.run_dir == "runs/a" and a.runs_root == "runs"
    a = parse_args(["--runs-root=r"], {"DASHBOARD_RUN_DIR": "x"})
    assert a.run_dir == "x" and a.runs_root == "r"
    a = parse_args(["--run-dir", "y"], {"DASHBOARD_RUN_DIR": "x", "DASHBOARD_RUNS_ROOT": "q"})
    assert a.run_dir == "y" and a.runs_root == "q"
    assert parse_args([], {}).run_dir is None


def test_find_runs_and_store_url(tmp_path):
    from dashboard.data import find_runs, store_url
    assert find_runs(str(tmp_path / "nope")) == [] and find_runs(str(tmp_path)) == []
    for name in ("b", "a"):
        (tmp_path / name / "capture.zarr").mkdir(parents=True)
    (tmp_path / "not_a_run").mkdir()
    assert find_runs(str(tmp_path)) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert store_url(str(tmp_path / "a")) == str(tmp_path / "a" / "capture.zarr")
    assert store_url(f"file://{tmp_path}/a") == str(tmp_path / "a" / "capture.zarr")
    assert store_url("s3://bucket/run") == "s3://bucket/run/capture.zarr"
    assert store_url("s3://bucket/run/capture.zarr") == "s3://bucket/run/capture.zarr"


def test_decoder():
    from dashboard.data import make_decoder
    dec = make_decoder(str(BPE))
    assert dec(464) == "The" and dec(50256) == "<|endoftext|>"
    assert make_decoder(None)(464) == "#464"
    assert make_decoder("/no/such/file")(464) == "#464"


def test_no_torch_import():
    code = ("import sys, dashboard.data, store.reader; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer', "
            "'capture')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr

"""The dashboard's argument parsing, run discovery and token decoding (no training here),
and that it never imports torch or trainer (it must start fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    # A run trained with capture.store elsewhere: its config.toml says where.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.toml").write_text('[capture]\nstore = "s3://b/c/capture.zarr"\n')
    assert store_url(str(tmp_path / "c")) == "s3://b/c/capture.zarr"


@pytest.mark.usefixtures("shared")
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


# ----------------------------------------------------------------------------- v2 stores

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from store_fixture import ACT_HOOK, STAT_HOOK, write_store  # noqa: E402,F401


@pytest.fixture
def v2(tmp_path):
    from store.reader import RunStore
    write_store(tmp_path / "run", [0, 10, 20, 30, 40], full=[0, 20, 40], snapshots=[0, 25, 40])
    return RunStore(tmp_path / "run" / "capture.zarr")


def test_run_summary_counts_captures_full_and_snapshots(v2):
    from dashboard.data import run_summary, summary_line
    s = run_summary(v2.url)
    assert (s["captured"], s["full"], s["snapshots"], s["max_steps"]) == (5, 3, 3, 40)
    assert "scheduled" not in s
    assert summary_line(s) == ("finished · 2 layers x 4 · captures 5 (3 full) · 3 snapshots · "
                               "40 steps planned")
    bad = run_summary(str(v2.url) + "-missing")
    assert bad["error"] and summary_line(bad).startswith("cannot be read: ")


def test_training_data_and_captures_line(v2):
    from dashboard.data import captures_line, training_data
    d = training_data(v2)
    assert d["captured"].tolist() == [0, 10, 20, 30, 40]
    assert d["full"].tolist() == [0, 20, 40] and d["snapshots"].tolist() == [0, 25, 40]
    assert captures_line(11, 7, 9) == "11 (7 full) · 9 snapshots"
    assert captures_line(1, 0, 1) == "1 (0 full) · 1 snapshot"


def test_captures_table_lists_tiers_and_snapshots(v2):
    from dashboard.data import captures_table
    df = captures_table(v2)
    assert df["step"].tolist() == [0, 10, 20, 25, 30, 40]  # 25: a snapshot, no capture
    assert df["tiers"].tolist() == ["summary, full", "summary", "summary, full", "",
                                    "summary", "summary, full"]
    assert df["snapshot"].tolist() == [True, False, False, True, False, True]


def test_nearest_full_prefers_at_or_after(v2, tmp_path):
    from dashboard.data import nearest_full
    from store.reader import RunStore
    assert [nearest_full(v2, s) for s in (0, 10, 20, 30, 35, 40, 99)] == [0, 20, 20, 40, 40,
                                                                          40, 40]
    write_store(tmp_path / "none", [0, 10], full=[])
    assert nearest_full(RunStore(tmp_path / "none" / "capture.zarr"), 5) is None


def test_top_tokens_reads_activations_at_full_steps_only(v2, monkeypatch):
    from dashboard.data import make_decoder, top_tokens
    from store.reader import RunStore
    dec = make_decoder(None)
    asked = []
    real = RunStore.activations

    def spy(self, hook, step, seq=None):
        asked.append(step)
        return real(self, hook, step, seq)

    monkeypatch.setattr(RunStore, "activations", spy)
    # a full step: the context is coloured from the stored activations
    rows = top_tokens(v2, ACT_HOOK, 20, 1, dec)
    assert asked == [20, 20] and all(r["from_acts"] for r in rows)
    a = v2.activations(ACT_HOOK, 20, 1)[:, 1].astype(np.float32)
    assert rows[0]["seq"] == 1 and rows[0]["pos"] == 5 and rows[0]["start"] == 0
    np.testing.assert_allclose(rows[0]["acts"], a[0:8])
    assert rows[0]["tokens"] == [f"#{t}" for t in v2.probe_tokens()[1, 0:8]]
    # a summary step: the activations are never asked for; only the top token has a value
    asked.clear()
    rows = top_tokens(v2, ACT_HOOK, 30, 1, dec)
    assert asked == [] and not any(r["from_acts"] for r in rows)
    assert rows[0]["acts"][5] == 9.0 and np.isnan(rows[0]["acts"][4])
    # a hook with statistics only, even at a full step
    rows = top_tokens(v2, STAT_HOOK, 20, 1, dec)
    assert asked == [] and not any(r["from_acts"] for r in rows) and len(rows) == 2


def test_attention_data_labels_cut_to_attn_len(v2):
    from dashboard.data import attention_data, make_decoder
    from store.errors import StoreError
    assert (v2.attn_len, v2.seq_len) == (4, 8)
    d = attention_data(v2, 1, 40, 0, make_decoder(None))
    assert d["pattern"].shape == (2, 4, 4)
    assert d["labels"] == [f"{i}:'#{100 + i}'" for i in range(4)]
    with pytest.raises(StoreError, match="summary capture only"):
        attention_data(v2, 1, 30, 0, make_decoder(None))


def test_icl_data_is_the_stores(v2):
    from dashboard.data import icl_data
    df = icl_data(v2)
    steps, score = v2.icl()
    assert df["step"].tolist() == steps.tolist() == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(df["icl"], score)
    np.testing.assert_allclose(score, [0, -0.05, -0.1, -0.15, -0.2], atol=1e-6)

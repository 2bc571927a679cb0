"""benchmarks/gpu_check.py, the one-shot check for a first GPU run, run here on CPU: every
check it makes for a GPU runs at tiny sizes (those that mean something only on CUDA are
skipped), so whoever runs it on a GPU finds the checks themselves working. About 3 minutes."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.integration

# The report's check names: stable, since reports are compared across machines.
CHECKS = ["bf16_loss", "ranks_gt_gpus", "nccl_capture_resume", "cpu_offload", "determinism",
          "gpt2_eager", "gpt2_capture", "train_speed", "gpt2_compile", "gpt2_compile_eval",
          "gpt2_compile_ac", "gpt2_capture_compile"]
CUDA_ONLY = {"ranks_gt_gpus", "cpu_offload"}


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "out"
    # --cpu: CPU mode even on a machine with a GPU, so the test means the same everywhere.
    r = run_cli(["benchmarks/gpu_check.py", "--quick", "--cpu", "--out", str(out)],
                timeout=900)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "cpu" and rep["quick"] is True
    assert {"device", "torch", "cuda", "total_s"} <= set(rep)
    assert "setup_error" not in rep, rep["setup_error"]
    by = {c["name"]: c for c in rep["checks"]}
    assert list(by) == CHECKS
    for name, c in by.items():
        assert {"status", "seconds", "error", "figures"} <= set(c), c
        if name in CUDA_ONLY:
            assert (c["status"], c["error"]) == ("skip", "needs CUDA"), c
        else:
            assert c["status"] == "pass", c
    f = {name: c["figures"] for name, c in by.items()}
    assert f["bf16_loss"]["worst_grad_rel_err"] < 0.05
    assert f["nccl_capture_resume"]["metrics_steps"] == list(range(1, 9))
    assert f["determinism"]["plain_max_rel_diff"] <= 1e-3
    assert f["gpt2_eager"]["step_ms"] > 0 and f["gpt2_capture"]["capture_ms"] > 0
    assert f["gpt2_compile_eval"]["recompiles"] == 0
    assert f["train_speed"]["fp32_ours_tokens_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert "ran on CPU" in summary and summary in r.stdout
    assert (out / "logs.tar.gz").is_file()

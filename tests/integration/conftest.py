"""Fixtures shared by the integration test modules. Their trainings start ahead, in the
background (helpers.ahead; tests/conftest.py's runs_ahead), and runs that do not depend on
each other train side by side (helpers.run_clis): on two cores a one-process run leaves the
other core idle."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CAP3, TINY_ARGS, ahead, ok, run_clis, torchrun, train_args


@ahead("dash_runs")
def _dash_runs(data: Path, base: Path) -> dict:
    runs = {"tiny": base / "runs" / "tiny", "nodyn": base / "nodyn" / "nodyn"}
    args = {"tiny": [*TINY_ARGS],
            "nodyn": [*TINY_ARGS, "--max-steps", "2", "--capture.dynamics=false"]}
    results = run_clis(*(["-m", "trainer", "--data", str(data), "--run-dir", str(runs[k]),
                          *args[k]] for k in runs))
    return {k: (runs[k], r) for k, r in zip(runs, results)}


@pytest.fixture(scope="session")
def dash_runs(runs_ahead, shakespeare_data) -> dict[str, Path]:
    """The dashboard's real tiny training runs, trained side by side: "tiny" (TINY_ARGS, with
    capture), alone in its folder, which the tests also use as a runs root; and "nodyn", the
    same for 2 steps with capture.dynamics = false."""
    runs = runs_ahead.take("dash_runs")
    for k, (_, r) in runs.items():
        assert r.returncode == 0, f"{k}: {r.stderr[-3000:]}"
    return {k: run for k, (run, _) in runs.items()}


@pytest.fixture(scope="session")
def tiny_run(dash_runs) -> Path:
    """One real tiny training run with capture (TINY_ARGS), shared by every dashboard test
    module; alone in its folder, which the tests also use as a runs root."""
    return dash_runs["tiny"]


@ahead("run_pair")
def _run_pair(data: Path, base: Path) -> dict:
    root = base / "root"
    runs = {"a": root / "a", "b": root / "b"}
    # b differs from a in two config keys (seed and lr); both write text samples
    args = {"a": [*TINY_ARGS, "--eval.sample_tokens=8"],
            "b": [*TINY_ARGS, "--eval.sample_tokens=8", "--train.seed=7", "--optim.lr=3e-3"]}
    results = run_clis(*(["-m", "trainer", "--data", str(data), "--run-dir", str(runs[k]),
                          *args[k]] for k in runs))
    return {k: (runs[k], r) for k, r in zip(runs, results)}


@pytest.fixture(scope="session")
def run_pair(runs_ahead, shakespeare_data) -> dict[str, Path]:
    """Two real tiny runs under one runs root (the root's path is run_pair["a"].parent),
    trained side by side: "a" (TINY_ARGS, with text samples at each evaluation) and "b", the
    same but for train.seed = 7 and optim.lr = 3e-3. For the dashboard's run picker, links
    that carry the run, and runs compared."""
    runs = runs_ahead.take("run_pair")
    for k, (_, r) in runs.items():
        assert r.returncode == 0, f"{k}: {r.stderr[-3000:]}"
    return {k: run for k, (run, _) in runs.items()}


@ahead("uninterrupted")
def _uninterrupted(data: Path, base: Path) -> dict:
    one, two = base / "one", base / "two"
    r1, r2 = run_clis(train_args(data, one, *CAP3),
                      torchrun(2) + train_args(data, two, *CAP3)[1:])
    return {"one": (one, r1), "two": (two, r2)}


@pytest.fixture(scope="session")
def uninterrupted(runs_ahead, shakespeare_data) -> dict[str, Path]:
    """Uninterrupted 12-step runs (helpers.TINY, captures CAP3): one process, and two FSDP
    ranks with the same global batch. The references that test_train.py's and
    test_resume_schedule.py's signalled, killed and resumed runs must equal."""
    runs = runs_ahead.take("uninterrupted")
    for _, r in runs.values():
        ok(r)
    return {k: run for k, (run, _) in runs.items()}

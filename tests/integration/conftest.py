"""Fixtures shared by the integration test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TINY_ARGS, run_cli


@pytest.fixture(scope="session")
def tiny_run(shakespeare_data, tmp_path_factory) -> Path:
    """One real tiny training run with capture (TINY_ARGS), shared by every dashboard test
    module; alone in its folder, which the tests also use as a runs root."""
    run = tmp_path_factory.mktemp("dash_runs") / "tiny"
    r = run_cli(["-m", "trainer", "--data", str(shakespeare_data), "--run-dir", str(run),
                 *TINY_ARGS])
    assert r.returncode == 0, r.stderr[-3000:]
    return run

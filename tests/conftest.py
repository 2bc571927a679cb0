import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (AHEAD, AHEAD_WITHOUT_DATA, BPE, CORPUS, SHARED, RunsAhead,  # noqa: E402
                     run_cli)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The offline corpus and tokenizer. A test that needs them errors, with this one line,
    where they are missing: skipping would pass a run that never checked them."""
    missing = [p for p in (CORPUS, BPE) if not p.is_file()]
    if missing:
        where = SHARED if not SHARED.is_dir() else missing[0]
        pytest.fail(f"../shared (offline corpus and tokenizer) not found at {where}; "
                    f"set SHARED_DIR", pytrace=False)
    return SHARED


@pytest.fixture(scope="session")
def shakespeare_data(shared, tmp_path_factory) -> Path:
    """tiny shakespeare tokenized offline by the project's own prepare CLI."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    r = run_cli(["-m", "trainer.prepare", "--text", str(CORPUS), "--out", str(out),
                 "--tokenizer-file", str(BPE), "--val-fraction", "0.05", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    return out


# Modules that mostly wait (SLURM's scheduler, a requeued job's ~40 s): they
# run first, while the integration tests' trainings run ahead beside them (runs_ahead).
RUN_FIRST = ["test_slurm.py", "test_slurm_multinode.py"]


def pytest_collection_modifyitems(session, config, items):
    """RUN_FIRST's modules first, then the unit tests, then the other integration tests
    (each in their own order): the integration tests' trainings run ahead, beside tests
    that leave a core of two idle (runs_ahead)."""
    def rank(item) -> int:
        path = Path(item.nodeid.split("::")[0])
        return 0 if path.name in RUN_FIRST else 2 if "integration" in path.parts[:-1] else 1

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def runs_ahead(request, tmp_path_factory):
    """helpers.RunsAhead over the AHEAD jobs (registered in the integration conftest and
    test modules) whose fixtures the collected tests use, in the order the tests need them,
    started at the session's first test."""
    items = request.session.items
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        for name in AHEAD:
            if name in item.fixturenames:
                first.setdefault(name, i)
    names = sorted(first, key=first.get)
    data = None
    if any(n not in AHEAD_WITHOUT_DATA for n in names):
        if CORPUS.is_file() and BPE.is_file():
            data = request.getfixturevalue("shakespeare_data")
        else:  # (their fixtures fail on the missing data, each in its own test)
            names = [n for n in names if n in AHEAD_WITHOUT_DATA]
    runs = RunsAhead(data, lambda name: tmp_path_factory.mktemp(f"ahead_{name}"), names)
    try:
        yield runs
    finally:
        runs.close()

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import BPE, CORPUS, SHARED, run_cli  # noqa: E402


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

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import BPE, CORPUS, run_cli  # noqa: E402


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """tiny shakespeare tokenized offline by the project's own prepare CLI."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    r = run_cli(["-m", "trainer.prepare", "--text", str(CORPUS), "--out", str(out),
                 "--tokenizer-file", str(BPE), "--val-fraction", "0.05", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    return out

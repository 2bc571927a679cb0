from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BPE, CORPUS, SHARED
from trainer.config import UserError
from trainer.tokenizer import EOT, get_encoding

TIKTOKEN_CACHE = SHARED / "data" / "tiktoken-cache"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("shared")
def test_local_file_encodes_like_gpt2():
    enc = get_encoding(str(BPE))
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "First Citizen:\nBefore we proceed any further, hear me speak.  123 'll"
    assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.usefixtures("shared")
def test_local_file_matches_r50k_from_cache_dir(tmp_path):
    # In a fresh interpreter: tiktoken keeps a process-wide registry of encodings.
    code = (
        "import tiktoken\n"
        "from trainer.tokenizer import get_encoding\n"
        f"a = get_encoding({str(BPE)!r}); b = tiktoken.get_encoding('r50k_base')\n"
        "assert a._mergeable_ranks == b._mergeable_ranks\n"
        "assert a._pat_str == b._pat_str and a._special_tokens == b._special_tokens\n"
        "assert a.n_vocab == b.n_vocab == 50257\n"
        "t = open(" + repr(str(CORPUS)) + ").read()[:20000]\n"
        "assert a.encode_ordinary(t) == b.encode_ordinary(t)\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE),
           "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.usefixtures("shared")
def test_default_falls_back_to_r50k_offline(tmp_path):
    # "gpt2" needs vocab.bpe/encoder.json, which the cache dir lacks: get_encoding("") must
    # fall back to r50k_base. An unreachable proxy keeps this from touching the network.
    code = (
        "from trainer.tokenizer import get_encoding\n"
        "e = get_encoding('')\n"
        "print(e.name, e.encode_ordinary('Hello world'))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_CACHE),
           "HOME": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["r50k_base", "[15496,", "995]"]


def test_default_without_cache_or_network_is_one_line_user_error(tmp_path):
    code = (
        "from trainer.tokenizer import get_encoding\n"
        "from trainer.config import UserError\n"
        "try:\n    get_encoding('')\nexcept UserError as e:\n    print(e)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
           "HOME": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "--tokenizer-file" in lines[0], r.stdout


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found") as e:
        get_encoding(str(tmp_path / "nope.tiktoken"))
    assert "\n" not in str(e.value)


def test_wrong_file_is_user_error(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not a bpe file\n")
    with pytest.raises(UserError) as e:
        get_encoding(str(bad))
    assert "\n" not in str(e.value)

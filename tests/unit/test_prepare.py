from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import helpers
from trainer import prepare
from trainer.tokenizer import EOT, get_encoding

ROOT = Path(__file__).resolve().parents[2]
BPE, SHAKESPEARE = str(helpers.BPE), str(helpers.CORPUS)
# Every test here tokenizes with the offline GPT-2 BPE (prepare loads it before anything else).
pytestmark = pytest.mark.usefixtures("shared")


@pytest.fixture(scope="module", autouse=True)
def offline_hf(tmp_path_factory):
    """No hub, and a private HF cache, for in-process runs (set before datasets is imported)."""
    home = tmp_path_factory.mktemp("hf")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
           "HF_DATASETS_CACHE": str(home / "datasets")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.prepare", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def split_tokens(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype="<u2") for s in m["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def documents(out: Path, split: str) -> list[str]:
    """The documents of a split, decoded: EOT comes before every document."""
    toks = split_tokens(out, split)
    if len(toks) == 0:
        return []
    assert toks[0] == EOT
    enc = get_encoding(BPE)
    cuts = np.flatnonzero(toks == EOT).tolist() + [len(toks)]
    return [enc.decode(toks[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p]


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def prep(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert prepare.main(["--out", str(out), "--tokenizer-file", BPE, "--workers", "1", *extra]) == 0
    return out


TS_ARGS = ["--val-fraction", "0.1", "--shard-tokens", "100000"]


@pytest.fixture(scope="module")
def cli_ts(tmp_path_factory, offline_hf) -> Path:
    """tinyshakespeare through the real CLI, with two tokenizer processes."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "ts"
    r = run_cli(["--text", SHAKESPEARE, "--out", str(out), "--tokenizer-file", BPE,
                 "--workers", "2", *TS_ARGS], offline_hf)
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and "val:" in r.stdout
    assert sorted(os.listdir(tmp)) == ["ts"]  # no tmp dir left behind
    return out


def test_cli_tinyshakespeare_roundtrip(cli_ts):
    out = cli_ts
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["eot"] == EOT
    assert m["vocab_size"] == 50257
    # the manifest records resolved paths (../shared may be a symlink)
    assert m["tokenizer"] == {"name": "gpt2", "bpe_file": str(Path(BPE).resolve())}
    assert m["source"]["files"] == [str(Path(SHAKESPEARE).resolve())]
    for split in ("train", "val"):
        shards = m["splits"][split]
        assert [s["file"] for s in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 100_000 for s in shards[:-1]) and 0 < shards[-1]["tokens"]
        assert sum(s["tokens"] for s in shards) == m["num_tokens"][split]
        for s in shards:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    assert len(m["splits"]["train"]) == 3  # ~296k train tokens in 100k shards
    want = paragraphs(Path(SHAKESPEARE).read_text())
    train, val = documents(out, "train"), documents(out, "val")
    assert sorted(train + val) == sorted(want)
    assert is_subsequence(train, want) and is_subsequence(val, want)  # order kept
    assert m["num_docs"] == {"train": len(train), "val": len(val)}
    assert 0.07 < len(val) / len(want) < 0.13


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path, cli_ts):
    # Same seed, in this process with one worker: not a byte differs from the CLI's run.
    a = prep(tmp_path, "a", "--text", SHAKESPEARE, *TS_ARGS)
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(cli_ts))
    for f in files:
        assert (a / f).read_bytes() == (cli_ts / f).read_bytes(), f
    c = prep(tmp_path, "c", "--text", SHAKESPEARE, *TS_ARGS, "--seed", "7")
    assert documents(a, "val") != documents(c, "val")
    ma, mc = (json.loads((d / "manifest.json").read_text()) for d in (a, c))
    assert ma["seed"] == 1337 and mc["seed"] == 7
    assert sum(ma["num_docs"].values()) == sum(mc["num_docs"].values())


def test_shard_tokens_cut_the_same_stream(tmp_path):
    one = prep(tmp_path, "one", "--text", SHAKESPEARE, "--val-fraction", "0")
    many = prep(tmp_path, "many", "--text", SHAKESPEARE, "--val-fraction", "0",
                "--shard-tokens", "30000")
    m = json.loads((many / "manifest.json").read_text())
    sizes = [s["tokens"] for s in m["splits"]["train"]]
    assert all(n == 30000 for n in sizes[:-1]) and 0 < sizes[-1] <= 30000
    assert m["splits"]["val"] == [] and m["num_tokens"]["val"] == 0
    assert np.array_equal(split_tokens(one, "train"), split_tokens(many, "train"))


def test_jsonl_parquet_and_max_docs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i}.\nIt has two lines, and some text: {i * 7}." for i in range(40)]
    jl = tmp_path / "data_docs.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    pqf = tmp_path / "data_docs.parquet"
    pq.write_table(pa.table({"body": docs, "id": list(range(40))}), pqf)
    for src in (jl, pqf):
        out = prep(tmp_path, src.suffix[1:], "--text", str(src), "--text-column", "body",
                   "--val-fraction", "0.2")
        got = documents(out, "train") + documents(out, "val")
        assert sorted(got) == sorted(docs)
    capped = prep(tmp_path, "capped", "--text", str(jl), str(pqf), "--text-column", "body",
                  "--max-docs", "55", "--val-fraction", "0")
    assert documents(capped, "train") == docs + docs[:15]  # files in order, then the cap


def test_dataset_folder_with_split_slice(tmp_path, offline_hf):
    # A local dataset folder goes through the same load_dataset(NAME, split=...) as the hub.
    folder = tmp_path / "data_ds"
    folder.mkdir()
    docs = [f"Story {i}: once upon a time." for i in range(20)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    r = run_cli(["--dataset", str(folder), "--split", "train[:50%]", "--out", str(out),
                 "--tokenizer-file", BPE, "--val-fraction", "0", "--workers", "1"], offline_hf)
    assert r.returncode == 0, r.stderr
    assert documents(out, "train") == docs[:10]
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["kind"] == "dataset" and m["source"]["split"] == "train[:50%]"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_bad_inputs_exit_2_one_line(tmp_path, offline_hf):
    (tmp_path / "notes.docx").write_text("x")
    cases = [
        (["--text", str(tmp_path / "missing.txt")], "not found"),
        (["--text", str(tmp_path / "notes.docx")], "unsupported extension"),
        (["--text", SHAKESPEARE, "--tokenizer-file", str(tmp_path / "no.tiktoken")], "tokenizer"),
    ]
    for args, words in cases:
        r = run_cli([*args, "--out", str(tmp_path / "o")], offline_hf)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and words in lines[0], lines
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_column_and_empty_input(tmp_path, capsys):
    jl = tmp_path / "data_x.jsonl"
    jl.write_text(json.dumps({"body": "hello"}) + "\n")
    empty = tmp_path / "data_empty.txt"
    empty.write_text("")
    for args, words in (([str(jl)], "column 'text'"), ([str(empty)], "no documents")):
        rc = prepare.main(["--text", *args, "--out", str(tmp_path / "o"),
                           "--tokenizer-file", BPE, "--workers", "1"])
        assert rc == 2
        assert words in _one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["data_empty.txt", "data_x.jsonl"]  # nothing left


def test_existing_out_needs_overwrite(tmp_path, capsys):
    jl = tmp_path / "data_a.jsonl"
    jl.write_text(json.dumps({"text": "first version"}) + "\n")
    out = prep(tmp_path, "out", "--text", str(jl), "--val-fraction", "0")
    jl.write_text(json.dumps({"text": "second version"}) + "\n")
    assert prepare.main(["--text", str(jl), "--out", str(out), "--tokenizer-file", BPE]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert documents(out, "train") == ["first version"]
    prep(tmp_path, "out", "--text", str(jl), "--val-fraction", "0", "--overwrite")
    assert documents(out, "train") == ["second version"]
    assert sorted(os.listdir(tmp_path)) == ["data_a.jsonl", "out"]

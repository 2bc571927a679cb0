"""`python -m trainer.synthetic`: documents of random tokens repeated once, lengths varying,
in a data dir the trainer reads; bad arguments are one line and exit 2."""

from __future__ import annotations

import json

import numpy as np

from helpers import run_cli, run_clis
from trainer.data import TokenWindows
from trainer.synthetic import repeated_documents


def split_documents(stream: np.ndarray, half: int, lo: int | None = None) -> list[int]:
    """Walk the stream as the generator lays it out (n from lo, default half/2, to half),
    returning each document's n."""
    ns, i = [], 0
    while i < len(stream):
        for n in range(half // 2 if lo is None else lo, half + 1):
            a, b = stream[i:i + n], stream[i + n:i + 2 * n]
            if len(b) == n and (a == b).all():
                ns.append(n)
                i += 2 * n
                break
        else:
            return ns  # the cut-off last document
    return ns


def test_documents_are_random_tokens_repeated_once_with_varying_lengths():
    s = repeated_documents(20_000, half=16, vocab=50, seed=3)
    assert s.dtype == np.uint16 and len(s) == 20_000 and s.max() < 50
    ns = split_documents(s, 16)
    assert sum(2 * n for n in ns) > 19_900  # the whole stream, but for the cut last one
    assert set(ns) == set(range(8, 17))  # every length from half/2 to half occurs
    assert (repeated_documents(1000, 16, 50, 3) == s[:1000]).all()  # seeded
    assert not (repeated_documents(1000, 16, 50, 4) == s[:1000]).all()


def test_previous_token_documents_copy_the_token_two_back():
    """--prev-frac: documents where each token is, half the time, the token two back (what
    a layer-0 head attending to the previous token and copying it predicts)."""
    vocab, half = 40, 12
    s = repeated_documents(60_000, half, vocab, seed=11, min_half=3,
                           prev_frac=0.3).astype(np.int64)
    two_back = (s[:-2] == s[2:]).mean()
    # ~30% of tokens are in such documents, about half of those (plus chance) copies; a
    # stream of repeats only would match two back about 1/vocab of the time
    assert 0.12 < two_back < 0.22, two_back
    plain = repeated_documents(60_000, half, vocab, seed=11, min_half=3).astype(np.int64)
    assert (plain[:-2] == plain[2:]).mean() < 0.05
    # the repeated documents are still there, and n now starts at min_half
    assert set(split_documents(plain, half, lo=3)) == set(range(3, half + 1))
    assert (repeated_documents(5000, half, vocab, 11, 3, 0.3) == s[:5000]).all()


def test_cli_writes_a_data_dir_the_trainer_reads(tmp_path):
    out, out2 = tmp_path / "rep", tmp_path / "prev"
    # two data dirs side by side: repeated documents; and with previous-token documents
    r, r2 = run_clis(["-m", "trainer.synthetic", "--out", str(out), "--vocab", "40", "--half",
                      "8", "--tokens", "5000", "--val-tokens", "600"],
                     ["-m", "trainer.synthetic", "--out", str(out2), "--vocab", "40", "--half",
                      "8", "--min-half", "4", "--prev-frac", "0.5", "--tokens", "5000",
                      "--val-tokens", "600", "--seed", "3"])
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["vocab_size"] == 40 and m["tokenizer"]["name"] == "none"
    assert m["num_tokens"] == {"train": 5000, "val": 600}
    x, y = TokenWindows(out, "train", 32, seed=0).get([0, 1])
    assert x.shape == (2, 32) and int(x.max()) < 40 and (x[:, 1:] == y[:, :-1]).all()
    val = np.fromfile(out / "val_000000.bin", np.uint16)
    train = np.fromfile(out / "train_000000.bin", np.uint16)
    assert not np.array_equal(val[:100], train[:100])  # val is other sequences
    # previous-token documents, in both splits, recorded in the manifest
    r = r2
    assert r.returncode == 0, r.stderr
    src = json.loads((out2 / "manifest.json").read_text())["source"]
    assert (src["min_half"], src["prev_frac"]) == (4, 0.5)
    for split in ("train", "val"):
        d = np.fromfile(out2 / f"{split}_000000.bin", np.uint16).astype(np.int64)
        assert (d[:-2] == d[2:]).mean() > 0.15
    again = run_cli(["-m", "trainer.synthetic", "--out", str(out)])
    assert again.returncode == 2 and again.stderr.startswith("error: ") and \
        "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_bad_arguments(tmp_path):
    cases = ((["--vocab", "70000"], "--vocab"), (["--half", "0"], "--half"),
             (["--tokens", "3", "--half", "8"], "at least one document"),
             (["--half", "8", "--min-half", "9"], "--min-half"),
             (["--prev-frac", "1.0"], "--prev-frac"))
    # side by side: each must be refused before it writes anything
    results = run_clis(*(["-m", "trainer.synthetic", "--out", str(tmp_path / "x"), *args]
                         for args, _ in cases))
    for (_, words), r in zip(cases, results):
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()

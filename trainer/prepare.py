"""Tokenize a corpus into GPT-2 token shards: `python -m trainer.prepare`.

    python -m trainer.prepare --text ../shared/data/tinyshakespeare.txt --out data/tinyshakespeare \
        --tokenizer-file ../shared/data/gpt2.tiktoken --val-fraction 0.1
    python -m trainer.prepare --dataset roneneldan/TinyStories --split 'train[:10%]' --out data/ts
    python -m trainer.prepare --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --streaming \
        --out data/fineweb-edu-10B

Both sources become one iterable of documents from `datasets`: a hub dataset (or a local
dataset folder) through `load_dataset(NAME, CONFIG, split=...)`, or local files through its
packaged builders ("text" with one document per blank-line separated paragraph for .txt,
"json" for .jsonl/.json, "parquet" for .parquet). Local files are always streamed, so no
Arrow copy of them lands in the Hugging Face cache.

Token stream: every document is `<|endoftext|>` (50256) followed by its tokens, i.e. EOT
*before* each document as llm.c does, so each document, the first of a shard included, is
announced by the delimiter. Documents are concatenated and cut into shards of
`--shard-tokens` tokens, also inside a document (the loader takes windows inside one shard,
so a cut costs at most one sequence per shard).

Train/val: a document goes to val when a keyed hash (blake2b, key = the seed) of its text
falls below `--val-fraction`. The rule depends only on the seed and the text, not on the
order, the number of workers or `--max-docs`, and exact duplicates land on the same side,
so a repeated document cannot leak from train into val.

Output (built in `OUT.tmp-<pid>`, renamed to OUT when complete, so OUT is never partial):
    OUT/manifest.json                      format, tokenizer, source, splits (see _manifest)
    OUT/train_000000.bin, ...              raw little-endian uint16 tokens (np.memmap-able)
    OUT/val_000000.bin, ...
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.cli import check_output_dir
from store.errors import ArgumentParser, UserError, run_cli
from trainer.tokenizer import EOT, VOCAB_SIZE, get_encoding

FORMAT_VERSION = 1  # of the shards and manifest.json (trainer.data checks it)
BATCH_DOCS = 256  # documents per task sent to a worker: big enough to amortize pickling
# Local file kinds -> (datasets builder, its config). Paragraphs: a .txt has many documents.
_BUILDERS = {".txt": ("text", {"sample_by": "paragraph"}), ".jsonl": ("json", {}),
             ".json": ("json", {}), ".parquet": ("parquet", {})}


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m trainer.prepare",
        description="Tokenize text into GPT-2 uint16 token shards plus manifest.json.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="Hugging Face dataset name (or local dataset folder)")
    src.add_argument("--text", nargs="+", metavar="FILE",
                     help="local files: .txt (paragraphs are documents), .jsonl, .parquet")
    p.add_argument("--name", default=None, help="dataset config name, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="dataset split, e.g. 'train[:1%%]'")
    p.add_argument("--streaming", action="store_true",
                   help="stream the dataset instead of downloading it whole (huge sets)")
    p.add_argument("--text-column", default="text", help="column holding the document text")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="fraction of documents for the val split (default 0.005)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val rule")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (default min(8, cpus))")
    p.add_argument("--tokenizer-file", default="",
                   help="local GPT-2 BPE file in tiktoken's format (offline); default: tiktoken's")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    return p


def _check_args(a: argparse.Namespace) -> None:
    if not 0.0 <= a.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    for flag, v in (("--shard-tokens", a.shard_tokens), ("--workers", a.workers)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if a.max_docs is not None and a.max_docs <= 0:
        raise UserError(f"--max-docs must be positive, got {a.max_docs}")
    if a.streaming and "[" in a.split:
        raise UserError(f"--streaming takes a plain split name, got {a.split!r}; "
                        "cap the size with --max-docs")
    for f in a.text or []:
        if not Path(f).is_file():
            raise UserError(f"input file {f!r} not found")
        if Path(f).suffix.lower() not in _BUILDERS:
            raise UserError(f"input file {f!r} has an unsupported extension; "
                            f"use one of {', '.join(_BUILDERS)}")


# ----------------------------------------------------------------------------- documents

def _read_error(e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"could not read the input: {type(e).__name__}: {first[:300]}")


def _datasets_errors() -> tuple[type[BaseException], ...]:
    from datasets.exceptions import DatasetsError

    # pyarrow's parse errors subclass ValueError, its IO errors OSError.
    return (OSError, ValueError, DatasetsError)


def _load(a: argparse.Namespace) -> list:
    """The source as a list of `datasets` (Iterable)Dataset objects, read one after another."""
    import datasets

    try:
        if a.dataset:
            return [datasets.load_dataset(a.dataset, a.name, split=a.split,
                                          streaming=a.streaming)]
        out = []
        # Consecutive files of the same kind share one builder; the user's order is kept.
        for suffix, group in itertools.groupby(a.text, key=lambda f: Path(f).suffix.lower()):
            builder, kw = _BUILDERS[suffix]
            files = [str(Path(f).resolve()) for f in group]
            out.append(datasets.load_dataset(builder, data_files=files, split="train",
                                             streaming=True, **kw))
        return out
    except _datasets_errors() as e:
        raise _read_error(e) from None


def _document_batches(a: argparse.Namespace) -> tuple[Iterator[list[str]], int | None]:
    """Batches of document texts (at most --max-docs in all), and their count if known."""
    parts = _load(a)
    col = a.text_column
    total = None
    if all(hasattr(d, "__len__") for d in parts):  # map-style datasets know their length
        total = sum(len(d) for d in parts)
        if a.max_docs is not None:
            total = min(total, a.max_docs)
    for d in parts:
        names = d.column_names  # None for some streamed sources: checked on the first batch
        if names is not None and col not in names:
            raise UserError(f"column {col!r} not in the input (columns: {', '.join(names)}); "
                            "choose one with --text-column")

    def gen() -> Iterator[list[str]]:
        left = a.max_docs if a.max_docs is not None else float("inf")
        try:
            for d in parts:
                for batch in d.iter(batch_size=BATCH_DOCS):
                    if col not in batch:
                        raise UserError(f"column {col!r} not in the input (columns: "
                                        f"{', '.join(batch)}); choose one with --text-column")
                    texts = [t for t in batch[col] if t]  # None / "" are not documents
                    if texts and not isinstance(texts[0], str):
                        raise UserError(f"column {col!r} holds {type(texts[0]).__name__}, "
                                        "not text; choose another with --text-column")
                    if len(texts) > left:
                        texts = texts[: int(left)]
                    left -= len(texts)
                    if texts:
                        yield texts
                    if left <= 0:
                        return
        except _datasets_errors() as e:
            raise _read_error(e) from None

    return gen(), total


# ----------------------------------------------------------------------------- tokenizing

_ENC = None  # the encoding inside a worker process (built once by _init_worker)


def _init_worker(bpe_file: str, name: str) -> None:
    global _ENC
    import tiktoken

    # Without a file, ask tiktoken for the encoding that worked in the parent: no retry of
    # a download that already failed there.
    _ENC = get_encoding(bpe_file) if bpe_file else tiktoken.get_encoding(name)


def _is_val(text: str, key: bytes, val_fraction: float) -> bool:
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key)
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0**64


def _encode_batch(task: tuple[list[str], bytes, float]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tokens of a batch of documents, split into (train, val), EOT before each document."""
    texts, key, val_fraction = task
    out: tuple[list[int], list[int]] = ([], [])
    counts = [0, 0]
    for t in texts:
        side = int(_is_val(t, key, val_fraction))
        out[side].append(EOT)
        out[side].extend(_ENC.encode_ordinary(t))
        counts[side] += 1
    return (np.array(out[0], dtype=np.uint16), np.array(out[1], dtype=np.uint16),
            counts[0], counts[1])


def _ordered_map(fn, tasks: Iterator, workers: int, bpe_file: str, name: str) -> Iterator:
    """fn over tasks in order, in `workers` processes, with a bounded number in flight.

    Pool.imap would do, but its feeder thread reads the whole input as fast as it can,
    which for a streamed 10B-token dataset means the whole dataset in memory.
    """
    if workers == 1:
        yield from map(fn, tasks)
        return
    # spawn: the parent holds datasets'/pyarrow's threads, which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(bpe_file, name)) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _ShardWriter:
    """Appends tokens to `{split}_{i:06d}.bin` files of `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = []  # {"file": name, "tokens": n}, as in the manifest
        self._f = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._f is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._f = open(self.folder / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._f.write(tokens[:room].astype("<u2", copy=False).tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]
            if self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())  # durable before the folder is renamed into place
            self._f.close()
            self._f = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


# ----------------------------------------------------------------------------- the run

def _source(a: argparse.Namespace) -> dict:
    common = {"text_column": a.text_column, "max_docs": a.max_docs}
    if a.text:
        return {"kind": "files", "files": [str(Path(f).resolve()) for f in a.text], **common}
    return {"kind": "dataset", "dataset": a.dataset, "name": a.name, "split": a.split,
            "streaming": a.streaming, **common}


def _manifest(a: argparse.Namespace, writers: dict[str, _ShardWriter], docs: dict) -> dict:
    # Everything here is a function of the inputs and flags: two runs with the same ones
    # write byte-identical manifests (no timings, no worker count, no output path).
    return {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "eot": EOT,
        "eot_position": "before_document",
        "vocab_size": VOCAB_SIZE,
        "tokenizer": {"name": "gpt2",
                      "bpe_file": str(Path(a.tokenizer_file).resolve()) if a.tokenizer_file
                      else ""},
        "source": _source(a),
        "seed": a.seed,
        "val_fraction": a.val_fraction,
        "shard_tokens": a.shard_tokens,
        "splits": {s: w.shards for s, w in writers.items()},
        "num_tokens": {s: w.tokens for s, w in writers.items()},
        "num_docs": docs,
    }


def prepare(a: argparse.Namespace) -> dict:
    """Tokenize the source into `a.out`; returns a summary for the user."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    _check_args(a)
    out = Path(a.out).resolve()
    check_output_dir(out, "--out")
    if out.exists() and not a.overwrite:
        raise UserError(f"{a.out!r} already exists; pass --overwrite to replace it")
    enc = get_encoding(a.tokenizer_file)  # fails early, before any reading
    batches, total = _document_batches(a)
    key = str(a.seed).encode()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    global _ENC
    _ENC = enc  # for --workers 1, which encodes in this process
    try:
        writers = {s: _ShardWriter(tmp, s, a.shard_tokens) for s in ("train", "val")}
        docs = {"train": 0, "val": 0}
        tasks = ((texts, key, a.val_fraction) for texts in batches)
        results = _ordered_map(_encode_batch, tasks, a.workers, a.tokenizer_file, enc.name)
        # disable=None: a bar on a terminal, nothing in a log file or a test's pipe.
        with tqdm(total=total, unit="docs", desc="tokenizing", disable=None) as bar:
            for train, val, n_train, n_val in results:
                writers["train"].write(train)
                writers["val"].write(val)
                docs["train"] += n_train
                docs["val"] += n_val
                bar.update(n_train + n_val)
                bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens,
                                refresh=False)
        for w in writers.values():
            w.close()
        if docs["train"] + docs["val"] == 0:
            raise UserError("the input has no documents (empty files, or an empty "
                            f"{a.text_column!r} column?)")
        if docs["train"] == 0:
            raise UserError(f"all {docs['val']} documents went to val; "
                            "lower --val-fraction or add data")
        manifest = _manifest(a, writers, docs)
        with open(tmp / "manifest.json", "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():  # --overwrite: the old one goes aside only once the new one is whole
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "docs": docs, "tokens": manifest["num_tokens"],
            "shards": {s: len(v) for s, v in manifest["splits"].items()},
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _prepare(_parser().parse_args(argv)))


def _prepare(args) -> None:
    s = prepare(args)
    for split in ("train", "val"):
        print(f"{split}: {s['docs'][split]:,} docs, {s['tokens'][split]:,} tokens, "
              f"{s['shards'][split]} shards")
    if s["docs"]["val"] == 0 and args.val_fraction > 0:
        print("warning: the val split is empty; raise --val-fraction or add data", file=sys.stderr)
    print(f"wrote {s['out']} in {s['seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())

"""A synthetic token dataset that rewards induction heads: `python -m trainer.synthetic`.

    python -m trainer.synthetic --out runs/data/repeats --vocab 32 --half 20 --min-half 6

Most documents are n random tokens (uniform over 0..vocab-1) followed by the same n tokens
again, n drawn per document from --min-half..--half: the second half is predictable only
by finding the earlier occurrence of the current token and copying the token after it,
which is what an induction head does (Olsson et al. 2022): in a 2-layer attention-only
model (`--model.attn_only=true`), a previous-token head in layer 0 and, composing with it,
a head in layer 1 that attends to the token after the earlier occurrence.

The rest (--prev-frac of the documents, 0.25 by default) are previous-token documents:
random tokens where each token is, with probability 1/2, a copy of the token two back.
They reward a layer-0 head that attends to the previous token and copies it, on their own;
without them that head gets a gradient only through a layer-1 head composing with it,
which does not exist yet. In configs/induction.toml's model (2 layers, attention only,
2 heads, 64 wide, vocab 32, lr 1e-3) they give layer 0 a previous-token score of about 0.5
by step 400 and 0.85 by step 600, and its layer-1 induction head forms between steps 250
and 400; with repeated documents alone the same model's layer 0 had not reached 0.2 in
3,000 steps.

Without them small models sit on a long plateau (copying any token seen in the context)
before the induction circuit forms: thousands of steps or more, with a run-to-run spread.
Keep the learning rate at 1e-3 or below with LayerNorm and GPT-2's 0.02 init: given a
hand-set previous-token head in layer 0, a minimal 2-layer model's layer 1 became an
induction head within 1,000 steps at 1e-3 and 3e-4, but stayed at the uniform loss at 3e-3
(without LayerNorm, 3e-3 worked).

The output is a data dir like `trainer.prepare` writes (manifest.json, uint16 shards,
train and val), with tokenizer "none": no text samples, and token ids below --vocab, so
train with `--model.vocab_size` at least that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from store.errors import ArgumentParser, UserError, run_cli
from trainer.prepare import FORMAT_VERSION  # not trainer.data: that imports torch


PREV_COPY = 0.5  # in previous-token documents, the chance a token copies the one two back


def default_min_half(half: int) -> int:
    return max(1, half // 2)


def repeated_documents(n_tokens: int, half: int, vocab: int, seed: int,
                       min_half: int | None = None, prev_frac: float = 0.0) -> np.ndarray:
    """[n_tokens] uint16: documents of 2n tokens, n drawn from min_half..half (default
    half/2..half) per document. With probability 1 - prev_frac a document is n random
    tokens and the same n again; else 2n random tokens, each of which from the third on is
    replaced, with probability PREV_COPY, by the token two before it (itself maybe a copy).
    The varying length matters: with one fixed length, a head attending a fixed distance
    back predicts the second half by position alone, and no induction head is needed."""
    rng = np.random.default_rng(seed)
    lo = default_min_half(half) if min_half is None else min_half
    out, filled = [], 0
    while filled < n_tokens:
        n = int(rng.integers(lo, half + 1))
        if prev_frac and rng.random() < prev_frac:
            doc = rng.integers(0, vocab, size=2 * n, dtype=np.uint16)
            copy = rng.random(2 * n) < PREV_COPY
            for t in np.flatnonzero(copy[2:]) + 2:  # in order: a copy may copy a copy
                doc[t] = doc[t - 2]
            out.append(doc)
        else:
            first = rng.integers(0, vocab, size=n, dtype=np.uint16)
            out += [first, first]
        filled += 2 * n
    return np.concatenate(out)[:n_tokens]


def write(out: Path, vocab: int, half: int, tokens: int, val_tokens: int, seed: int,
          overwrite: bool = False, min_half: int | None = None, prev_frac: float = 0.0) -> dict:
    if not 2 <= vocab <= 65535:
        raise UserError(f"--vocab must be in 2..65535 (uint16 tokens), got {vocab}")
    if half < 1:
        raise UserError(f"--half must be at least 1, got {half}")
    if min_half is None:
        min_half = default_min_half(half)
    elif not 1 <= min_half <= half:
        raise UserError(f"--min-half must be in 1..--half ({half}), got {min_half}")
    if not 0.0 <= prev_frac < 1.0:
        raise UserError(f"--prev-frac must be in [0, 1), got {prev_frac}")
    if tokens < 2 * half or val_tokens < 2 * half:
        raise UserError(f"--tokens and --val-tokens must hold at least one document "
                        f"({2 * half} tokens)")
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits, counts = {}, {}
        # Different seeds per split: val is new sequences, not train's again.
        for i, (split, n) in enumerate((("train", tokens), ("val", val_tokens))):
            data = repeated_documents(n, half, vocab, seed * 2 + i, min_half, prev_frac)
            name = f"{split}_000000.bin"
            data.tofile(tmp / name)
            splits[split] = [{"file": name, "tokens": int(data.size)}]
            counts[split] = int(data.size)
        manifest = {
            "format_version": FORMAT_VERSION, "dtype": "uint16", "eot": None,
            "eot_position": "none", "vocab_size": vocab, "tokenizer": {"name": "none"},
            "source": {"kind": "synthetic", "generator": "repeated", "half": half,
                       "min_half": min_half,
                       "prev_frac": prev_frac, "vocab": vocab},
            "seed": seed, "val_fraction": val_tokens / (tokens + val_tokens),
            "shard_tokens": max(counts.values()), "splits": splits, "num_tokens": counts,
            "num_docs": {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m trainer.synthetic", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the data dir to write")
    p.add_argument("--vocab", type=int, default=256, help="token ids 0..vocab-1 (default 256)")
    p.add_argument("--half", type=int, default=16,
                   help="n: random tokens per document, then repeated (default 16)")
    p.add_argument("--min-half", type=int, default=None,
                   help="shortest n (default --half/2)")
    p.add_argument("--prev-frac", type=float, default=0.25,
                   help="fraction of previous-token documents (default 0.25)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="train tokens (default 2M)")
    p.add_argument("--val-tokens", type=int, default=65_536, help="val tokens (default 65536)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return run_cli(lambda: _run(p.parse_args(argv)))


def _run(a) -> None:
    m = write(Path(a.out), a.vocab, a.half, a.tokens, a.val_tokens, a.seed, a.overwrite,
              a.min_half, a.prev_frac)
    src = m["source"]
    print(f"wrote {a.out}: {m['num_tokens']['train']:,} train and {m['num_tokens']['val']:,} "
          f"val tokens, documents of {src['min_half']}..{a.half} random tokens twice "
          f"({a.prev_frac:.0%} previous-token documents), vocab {a.vocab}")


if __name__ == "__main__":
    sys.exit(main())

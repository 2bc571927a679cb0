"""The GPT-2 tokenizer (tiktoken), from the internet or from a local BPE file, and the one
place every command finds a run's tokenizer (`resolve`, `local_bpe_file`).

Two ways to get the same tokenizer, one code path:
- `get_encoding()`: tiktoken's own "gpt2", downloaded once into tiktoken's cache. Offline,
  `TIKTOKEN_CACHE_DIR` pointing at a folder holding the `r50k_base` cache entry works too:
  "gpt2" needs two other files (vocab.bpe, encoder.json), so on failure we ask for
  "r50k_base", which is the identical tokenizer (same ranks, split pattern and specials).
- `get_encoding("path/to/gpt2.tiktoken")`: built from a local BPE file in tiktoken's format
  (`data.tokenizer_file` / `--tokenizer-file`), for machines without internet.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiktoken
import tiktoken.load

from store.errors import UserError

EOT = 50256  # <|endoftext|>: separates documents in the token stream
VOCAB_SIZE = 50257  # 50256 BPE ranks + <|endoftext|>

# GPT-2's split pattern, as tiktoken writes it for r50k_base / gpt2 (equivalent to the
# original release's regex, but faster). Copied rather than imported from tiktoken_ext,
# whose module layout is not a public API.
R50K_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def local_bpe_file(tokenizer_file: str = "", data_tokenizer_file: str = "",
                   data_dir: str = "") -> str:
    """The local BPE file a command uses, "" for tiktoken's own, in this order: a file
    given on the command line, the run config's data.tokenizer_file (either used as given: a
    bad one is an error), the file `trainer.prepare` recorded in the data dir's manifest
    when it is still there."""
    if tokenizer_file or data_tokenizer_file:
        return tokenizer_file or data_tokenizer_file
    if data_dir:
        try:
            manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
            recorded = manifest.get("tokenizer", {}).get("bpe_file", "") or ""
        except (OSError, ValueError, AttributeError):
            recorded = ""
        if recorded and Path(recorded).is_file():
            return recorded
    return ""


def resolve(tokenizer_file: str = "", cfg=None, data_dir: str = "") -> tiktoken.Encoding:
    """A run's tokenizer (`cfg`: its RunConfig, if any): see `local_bpe_file`."""
    data = cfg.data if cfg is not None else None
    return get_encoding(local_bpe_file(tokenizer_file, data.tokenizer_file if data else "",
                                       data_dir or (data.dir if data else "")))


def get_encoding(bpe_file: str = "") -> tiktoken.Encoding:
    """GPT-2's encoding: from `bpe_file` if given, else from tiktoken (download or cache)."""
    if bpe_file:
        return _from_file(bpe_file)
    errors = []
    for name in ("gpt2", "r50k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # network errors come in many types (requests, urllib, OSError)
            errors.append(f"{name}: {type(e).__name__}")
    raise UserError(
        "could not load the GPT-2 tokenizer from tiktoken (" + "; ".join(errors) + "); "
        "offline, pass a local BPE file with --tokenizer-file / data.tokenizer_file "
        "(e.g. ../shared/data/gpt2.tiktoken)"
    )


def _from_file(bpe_file: str) -> tiktoken.Encoding:
    path = Path(bpe_file).expanduser()
    if not path.is_file():
        raise UserError(
            f"tokenizer file {bpe_file!r} not found; pass a GPT-2 BPE file in tiktoken's "
            "format (e.g. ../shared/data/gpt2.tiktoken) or leave it empty to use tiktoken's"
        )
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    except Exception as e:  # a file in another format fails inside tiktoken's parser
        raise UserError(f"tokenizer file {bpe_file!r} is not a tiktoken BPE file: {e}") from None
    if len(ranks) != EOT:
        raise UserError(
            f"tokenizer file {bpe_file!r} has {len(ranks)} ranks; GPT-2's has {EOT}"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=R50K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )

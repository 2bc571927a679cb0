"""The command line of `capture.prompt`:

    python -m capture.prompt --run-dir RUN --text "..." [--steps all|N,M,...] [--hook H ...]
                             [--top-k K] [--lens] [--device cpu] --out FILE.npz

writes FILE.npz with `tokens` int64 [T], `steps` int64 [S], `loss` float32 [S, T-1],
`top_ids` int64 [S, T, K] and `top_probs` float32 [S, T, K] (K = --top-k, default 5; 0
leaves them out), `lens` float32 [S, L, T-1] with --lens, and one float32 array per hook
asked for, named by the hook (--hook repeats and takes fnmatch patterns such as
'blocks.*.hook_resid_post'; `blocks.L.attn.hook_pattern` is [S, H, T, T], the others
[S, T, D]). The file is written under a temporary name next to FILE and renamed into
place, so an interrupted run never leaves a partial file. `--ids 1,2,3` instead of
--text passes token ids. Bad input: one line `error: ...` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from capture.prompt import PromptResult, run_text
from store.errors import ArgumentParser, UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    files = doc[doc.find("writes FILE.npz"):doc.find("Bad input: one line")].strip()
    p = ArgumentParser(prog="python -m capture.prompt",
                description="Run your own text through a run's model at its weight snapshot "
                            "(or checkpoint) steps and save the per-step loss, next-token "
                            "candidates and hook activations as one .npz file.",
                epilog=files, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="the run's folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text, tokenized with the run's tokenizer")
    what.add_argument("--ids", metavar="ID,ID,...", help="token ids instead of text")
    p.add_argument("--steps", default="all", metavar="all|N,M,...",
                   help="'all' (every weight snapshot step, the default) or comma-separated "
                        "snapshot or checkpoint steps")
    p.add_argument("--hook", action="append", default=[], metavar="NAME",
                   help="hook name or fnmatch pattern whose activations to save; repeatable")
    p.add_argument("--top-k", type=int, default=5, help="next-token candidates per position "
                   "(default 5; 0: none)")
    p.add_argument("--lens", action="store_true", help="also the logit lens, per layer")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--tokenizer-file", default="", metavar="PATH",
                   help="GPT-2 BPE file in tiktoken's format (default: the run's)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.npz",
                   help="the .npz file to write")
    return p


def _parse_ints(s: str, what: str, example: str) -> list[int]:
    parts = [x.strip() for x in s.split(",")]
    try:
        vals = [int(x) for x in parts]
    except ValueError:
        vals = []
    if not vals or any(v < 0 for v in vals):
        raise UserError(f"{what} must be {example}, got {s!r}")
    return vals


def parse_steps(s: str) -> str | list[int]:
    """--steps: "all" or comma-separated non-negative steps."""
    s = s.strip()
    if s == "all":
        return "all"
    return _parse_ints(s, "--steps", "'all' or comma-separated steps such as 0,100,200")


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out}/prompt.npz")
    parent = out.parent
    p = parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--out: {p} is a file, so {parent} cannot be made; choose another "
                        f"--out")


def save_npz(res: PromptResult, out: Path) -> Path:
    """The result as one .npz (see the module docstring), written under a temporary name
    next to `out` and renamed into place."""
    arrays: dict[str, np.ndarray] = {"tokens": res.tokens, "steps": res.steps,
                                     "loss": res.loss}
    if res.top.ids.shape[-1]:
        arrays["top_ids"], arrays["top_probs"] = res.top.ids, res.top.probs
    if res.lens is not None:
        arrays["lens"] = res.lens
    arrays.update(res.acts)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {out.parent} ({e.strerror})") from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez adds no .npz to the name
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def run(args) -> int:
    steps = parse_steps(args.steps)
    _check_out(args.out)
    if args.ids is not None:
        text: Any = np.asarray(_parse_ints(args.ids, "--ids",
                                           "comma-separated token ids such as 464,3290"))
    else:
        text = args.text
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")

    def progress(done: int, total: int, step: int) -> None:  # on a terminal only
        print(f"\rstep {step} ({done}/{total})", end="\n" if done == total else "",
              file=sys.stderr, flush=True)

    res = run_text(args.run_dir, text, steps=steps, hooks=args.hook, device=args.device,
                   top_k=args.top_k, lens=args.lens, tokenizer_file=args.tokenizer_file,
                   progress=progress if sys.stderr.isatty() else None)
    print(save_npz(res, args.out))
    print(f"wrote {len(res.tokens)} tokens x {len(res.steps)} steps "
          f"({', '.join(map(str, res.steps.tolist()))}), {len(res.acts)} hook(s) to {args.out}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(lambda: run(build_parser().parse_args(argv)))
    except KeyboardInterrupt:
        print("error: interrupted; no partial file was left under --out", file=sys.stderr)
        return 130


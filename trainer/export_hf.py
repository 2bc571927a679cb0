"""Export a run's checkpoint (or weight snapshot) as a Hugging Face GPT-2 folder.

    python -m trainer.export_hf --run-dir runs/tiny --out hf/tiny [--step N]
        [--tokenizer-file PATH | --no-tokenizer]

The folder (config.json, generation_config.json, model.safetensors, and the GPT-2
tokenizer files) loads with `transformers.GPT2LMHeadModel.from_pretrained(DIR)` and gives
the same numbers as our model, and with TransformerLens'
`TransformerBridge.boot_transformers(DIR)` (which also needs the tokenizer files).

`--step N`: the checkpoint of step N when the run kept one, else the weight snapshot of
step N in the run's capture store (bf16 weights, exported as float32); default: the latest
checkpoint. The last line says which it used. `python -m capture.export --format hf` does
the same from a store alone.

Tokenizer: `--tokenizer-file`, else the run's. When no tokenizer can be had (offline
without a BPE file) the weights are exported anyway, with a warning.
Needs `transformers` and `safetensors` (`pip install .[hf]`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from store.errors import ArgumentParser, UserError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m trainer.export_hf",
        description="Write a run's checkpoint or weight snapshot as a Hugging Face GPT-2 "
                    "folder.",
    )
    p.add_argument("--run-dir", required=True, help="run dir of a training run")
    p.add_argument("--out", required=True, help="folder to write (created if missing)")
    p.add_argument("--step", type=int, default=None,
                   help="step of a checkpoint or weight snapshot (default: latest checkpoint)")
    p.add_argument("--tokenizer-file", default=None,
                   help="GPT-2 BPE file in tiktoken's format (default: the run's)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the weights only")
    return p


def run(args: argparse.Namespace) -> Path:
    from trainer import hf
    from trainer.snapshots import load_model_at

    hf._transformers()  # fail before the (slow) checkpoint load when it is not installed
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a folder")
    loaded = load_model_at(args.run_dir, step=args.step, device="cpu")
    model, cfg, step = loaded.model, loaded.cfg, loaded.step
    encoding = None
    if not args.no_tokenizer:
        from trainer.tokenizer import resolve

        try:
            encoding = resolve(args.tokenizer_file, cfg)
        except UserError as e:
            if args.tokenizer_file:  # asked for explicitly: that is an error
                raise
            print(f"warning: exporting without tokenizer files: {e}", file=sys.stderr)
    hf.save_hf(model, out, encoding=encoding)
    print(f"exported {args.run_dir} step {step} from {loaded.where} "
          f"({cfg.model.num_params() / 1e6:.2f}M parameters) to {out}"
          f"{'' if encoding is not None else ' (no tokenizer files)'}")
    return out


def main(argv: list[str] | None = None) -> int:
    from store.errors import run_cli
    from trainer.hf import quiet_cli

    quiet_cli()
    return run_cli(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

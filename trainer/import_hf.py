"""Make a run dir from released GPT-2 weights (or any local Hugging Face GPT-2 folder).

    python -m trainer.import_hf --hf gpt2 --run-dir runs/gpt2-124M [--dropout 0.0]
    python -m trainer.import_hf --hf path/to/hf_folder --run-dir runs/mine

Writes RUN/config.toml (a run config with the model's shape) and a weights-only checkpoint
at step 0, so `trainer.generate`, `trainer.export_hf` and fine-tuning work on it.
A hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-community/...) is downloaded
by `transformers`; a folder is read offline. Needs `transformers` (`pip install .[hf]`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from store.errors import ArgumentParser, UserError
from trainer.config import RunConfig


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m trainer.import_hf",
        description="Make a run dir (config + step-0 checkpoint) from Hugging Face GPT-2 weights.",
    )
    p.add_argument("--hf", required=True, help="hub name (e.g. gpt2) or local folder")
    p.add_argument("--run-dir", required=True, help="run dir to create")
    p.add_argument("--dropout", type=float, default=None,
                   help="model.dropout of the run (default: the Hugging Face config's)")
    p.add_argument("--tokenizer-file", default="",
                   help="recorded as data.tokenizer_file (a GPT-2 BPE file in tiktoken's format)")
    p.add_argument("--force", action="store_true",
                   help="write into a run dir that already has a config.toml")
    return p


def run(args: argparse.Namespace) -> Path:
    from trainer import hf
    from trainer.checkpoint import list_complete, save_model_only

    hf._transformers()
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {args.run_dir!r} exists and is not a folder")
    if (run_dir / "config.toml").exists() and not args.force:
        raise UserError(f"{str(run_dir / 'config.toml')!r} exists; pick a new --run-dir "
                        "or pass --force to overwrite")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.tokenizer_file and not Path(args.tokenizer_file).is_file():
        raise UserError(f"tokenizer file {args.tokenizer_file!r} not found")

    model = hf.from_hf(args.hf, dropout=args.dropout)
    cfg = RunConfig(run_dir=str(run_dir), model=model.cfg)
    tok = args.tokenizer_file
    cfg.data.tokenizer_file = str(Path(tok).resolve()) if tok else ""
    cfg.validate()
    if list_complete(run_dir) and not args.force:
        raise UserError(f"{str(run_dir)!r} already has checkpoints; pick a new --run-dir "
                        "or pass --force")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    save_model_only(run_dir, model, cfg, step=0)
    c = cfg.model
    print(f"imported {args.hf} ({c.num_params() / 1e6:.2f}M parameters: n_layer {c.n_layer}, "
          f"n_head {c.n_head}, n_embd {c.n_embd}, block_size {c.block_size}, "
          f"vocab_size {c.vocab_size}) into {run_dir} at step 0")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from store.errors import run_cli
    from trainer.hf import quiet_cli

    quiet_cli()
    return run_cli(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

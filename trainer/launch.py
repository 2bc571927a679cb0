"""`python -m trainer` (and `gpt2-train`): the trainer's command line.

    python -m trainer --config configs/tiny.toml --data DIR --run-dir RUN [--max-steps N]
        [--resume] [--section.key=value ...]

The flags and the whole config are read and checked here before torch is imported (about
5 s of imports on a CPU node), so `--help`, a mistyped key or a value outside its meaning
answers at once, on every rank, before any process group forms.
"""

from __future__ import annotations

import os

from store.errors import ArgumentParser, run_cli
from trainer import config as config_mod
from trainer.config import ConfigError, RunConfig


def parse_args(argv: list[str] | None):
    """The launch flags (argparse), and the rest: `--section.key=VALUE` config overrides,
    which `config.load` hands to tyro."""
    p = ArgumentParser(
        prog="python -m trainer", allow_abbrev=False, add_help=False,
        description="Train GPT-2 (FSDP2 under torchrun).",
        epilog="Any config key can be set as --section.key=VALUE, e.g. --model.n_layer=4 "
               "--optim.lr=3e-4 --parallel.sharding=grad; every key follows, with its "
               "default (the --config file's, when one is given).",
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--config", help="TOML config file (configs/NAME.toml)")
    p.add_argument("--data", help="token shards from python -m trainer.prepare (data.dir)")
    p.add_argument("--run-dir", help="where config, checkpoints, metrics and logs go")
    p.add_argument("--max-steps", help="optimizer steps (train.max_steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run dir's latest complete checkpoint")
    p.add_argument("--plan", action="store_true",
                   help="print the capture plan (every tier's steps and bytes, against "
                        "capture.budget) and exit, without data or training")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --plan: the world size to plan for (default: this launch's)")
    p.add_argument("--print-run-dir", action="store_true",
                   help="check the config and arguments, print the run dir and exit "
                        "(for launch scripts)")
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        print()
    for flag, key in (("data", "data.dir"), ("run_dir", "run_dir"),
                      ("max_steps", "train.max_steps")):
        if getattr(args, flag) is not None:
            rest.append(f"--{key}={getattr(args, flag)}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(*parse_args(argv)))


def _main(args, overrides: list[str]) -> int:
    if args.help:
        cfg = config_mod.from_dict(config_mod.load_toml(args.config)) if args.config \
            else RunConfig()
        config_mod.print_help(cfg, "python -m trainer")
        return 0
    cfg = config_mod.load(args.config, overrides)
    if args.print_run_dir:
        print(cfg.run_dir)
        return 0
    if args.plan:
        from trainer import capture_setup  # torch: the plan counts the model's parameters

        world = args.world_size if args.world_size is not None \
            else int(os.environ.get("WORLD_SIZE", "1"))
        if world < 1:
            raise ConfigError(f"--world-size must be at least 1, got {world}")
        if os.environ.get("RANK", "0") == "0":
            print(capture_setup.plan_text(cfg, world))
        return 0
    from trainer.train import run

    return run(cfg, resume=args.resume)

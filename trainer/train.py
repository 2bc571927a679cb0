"""`python -m trainer`: train GPT-2, one process or many (torchrun, SLURM).

    python -m trainer --config configs/tiny.toml --data DIR --run-dir RUN [--max-steps N]
        [--resume] [--section.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer import config as config_mod
from trainer import dist as tdist
from trainer.config import ConfigError, RunConfig, UserError
from trainer.data import DistributedLoader, TokenWindows, load_manifest
from trainer.evaluate import maybe_eval
from trainer.metrics import MetricsLogger, peak_flops, plot_loss
from trainer.model import GPT
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.parallelize import parallelize


class TrainingDiverged(Exception):
    pass


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 ask for a checkpoint at the next step
    boundary and a clean exit. The handler only sets a flag; a second Ctrl-C interrupts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def requested(self, info: tdist.DistInfo) -> bool:
        # A collective every rank must reach, each step: a signal may reach only some ranks.
        return tdist.any_rank(self.received is not None, info)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="python -m trainer", allow_abbrev=False,
        description="Train GPT-2 (FSDP2 under torchrun).",
        epilog="Any config key can be set as --section.key=VALUE, e.g. --model.n_layer=4 "
               "--optim.lr=3e-4 --parallel.sharding=grad. See configs/*.toml for the keys.",
    )
    p.add_argument("--config", help="TOML config file (configs/NAME.toml)")
    p.add_argument("--data", help="token shards from python -m trainer.prepare (data.dir)")
    p.add_argument("--run-dir", help="where config, checkpoints, metrics and logs go")
    p.add_argument("--max-steps", help="optimizer steps (train.max_steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run dir's latest complete checkpoint")
    args, rest = p.parse_known_args(argv)
    for flag, key in (("data", "data.dir"), ("run_dir", "run_dir"),
                      ("max_steps", "train.max_steps")):
        if getattr(args, flag) is not None:
            rest.append(f"--{key}={getattr(args, flag)}")
    return args, rest


def grad_accum_steps(cfg: RunConfig, world: int) -> int:
    per_round = cfg.train.micro_batch_size * cfg.seq_len * world
    if cfg.train.global_batch_tokens % per_round:
        raise ConfigError(
            f"train.global_batch_tokens ({cfg.train.global_batch_tokens}) must be a multiple of "
            f"micro_batch_size x seq_len x world_size = {per_round}"
        )
    return cfg.train.global_batch_tokens // per_round


def _shape(m) -> str:
    return f"n_layer={m.n_layer} n_head={m.n_head} n_embd={m.n_embd} " \
           f"block_size={m.block_size} vocab_size={m.vocab_size} bias={m.bias}"


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    run_dir = Path(cfg.run_dir)
    if (run_dir / "config.toml").is_file():
        old = config_mod.load_run_config(run_dir)
        if old.model != cfg.model:
            raise UserError(
                f"run dir {run_dir} was made with a model of {_shape(old.model)}, but this "
                f"config asks for {_shape(cfg.model)}; use a new --run-dir or the same shape"
            )
    latest = checkpoint.latest_step(run_dir)
    if latest is not None and not resume:
        raise UserError(
            f"run dir {run_dir} already has checkpoints (latest: step {latest}); pass --resume "
            f"to continue it, or choose a new --run-dir"
        )


def write_config(cfg: RunConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(cfg.to_toml())
    tmp.replace(run_dir / "config.toml")


def build_model(cfg: RunConfig, info: tdist.DistInfo) -> GPT:
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and world size
    if cfg.parallel.meta_init:
        # Allocate only this rank's shards: materialise after sharding, then initialise.
        with torch.device("meta"):
            model = GPT(cfg.model)
        model = parallelize(model, cfg.parallel, info, cfg.train.dtype)
        model.to_empty(device=info.device)
        model.init_weights()
        return model
    model = GPT(cfg.model).to(info.device)
    return parallelize(model, cfg.parallel, info, cfg.train.dtype)


def train_step(model, optimizer, loader, accum: int, lr: float, cfg: RunConfig,
               info: tdist.DistInfo, autocast) -> tuple[float, float]:
    set_lr(optimizer, lr)
    loss_sum = torch.zeros((), device=info.device)
    for micro in range(accum):
        x, y = loader.next_batch()
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if info.distributed:
            # Reduce-scatter gradients once per step, on the last micro-batch.
            model.set_requires_gradient_sync(micro == accum - 1)
        with autocast():
            loss = model(x, y)
        (loss / accum).backward()
        loss_sum += loss.detach()
    tdist.all_reduce_sum(loss_sum, info)  # collective
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    # The step's one sync point: loss and grad norm to the host, checked before the update.
    loss_val, norm_val = torch.stack([loss_sum / (accum * info.world), grad_norm]).tolist()
    if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
        raise TrainingDiverged(f"loss {loss_val}, grad norm {norm_val}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_val, norm_val


def run(cfg: RunConfig, resume: bool) -> int:
    info = tdist.init(cfg.parallel.device)
    is_main = info.is_main
    try:
        check_run_dir(cfg, resume)  # every rank checks before rank 0 writes anything
        manifest = load_manifest(cfg.data.dir)
        windows = TokenWindows(cfg.data.dir, "train", cfg.seq_len, seed=cfg.data.seed)
        TokenWindows(cfg.data.dir, "val", cfg.seq_len, shuffle=False)  # fail early if short
        accum = grad_accum_steps(cfg, info.world)
        hellaswag_examples = None
        if cfg.eval.hellaswag_file:
            from trainer import hellaswag
            hellaswag_examples = hellaswag.load_examples(
                cfg.eval.hellaswag_file, cfg.eval.hellaswag_examples)
        enc = _tokenizer(cfg, manifest, is_main)
        tdist.barrier(info)
        if is_main:
            write_config(cfg)

        model = build_model(cfg, info)
        optimizer = build_optimizer(model, cfg.optim, info.device)
        loader = DistributedLoader(windows, cfg.train.micro_batch_size, info.rank, info.world)
        step = 0
        if resume:
            meta = checkpoint.load(cfg.run_dir, model, optimizer, info)  # collective
            if meta is not None:
                step = meta["step"]
                seqs_per_round = info.world * cfg.train.micro_batch_size
                windows_done = meta.get("data", {}).get("windows", 0)
                loader.load_state_dict({"position": windows_done // seqs_per_round})
                if is_main:
                    print(f"resumed from step {step} "
                          f"({checkpoint.step_dir(cfg.run_dir, step)})", flush=True)
            elif is_main:
                print(f"--resume: no checkpoint in {cfg.run_dir} yet; starting at step 0")
        if is_main:
            _print_plan(cfg, info, accum, model)

        autocast = _autocast(cfg, info)
        flops = model.flops_per_token(cfg.seq_len)
        peak = peak_flops(torch.cuda.get_device_name(info.device)) \
            if info.device.type == "cuda" else None
        logger = MetricsLogger(cfg, resume_step=step) if is_main else None
        stops = StopSignals()
        tokens_per_step = cfg.train.global_batch_tokens
        stop = False
        while step < cfg.train.max_steps and not stop:
            lr = lr_at(step, cfg.optim, cfg.train.max_steps)
            t0 = time.perf_counter()
            try:
                loss, grad_norm = train_step(model, optimizer, loader, accum, lr, cfg, info,
                                             autocast)
            except TrainingDiverged as e:
                last = checkpoint.latest_step(cfg.run_dir)
                raise UserError(
                    f"non-finite training at step {step + 1} ({e}); stopped. Last good "
                    f"checkpoint: {'step ' + str(last) if last is not None else 'none'}. "
                    f"Lower optim.lr or raise optim.warmup_steps, then --resume"
                ) from None
            step += 1
            dt = time.perf_counter() - t0
            record = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / dt, "step_ms": dt * 1e3}
            if peak:
                record["mfu"] = flops * tokens_per_step / dt / (peak * info.world)
            record.update(maybe_eval(model, cfg, info, step, enc, autocast, hellaswag_examples))
            if is_main:
                logger.log(step, record, echo=step % cfg.log.every == 0 or "val_loss" in record)
                if "sample" in record:
                    print(f"--- sample at step {step} ---\n{record['sample']}\n---", flush=True)
            stop = stops.requested(info)  # collective
            if stop or step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
                checkpoint.save(
                    cfg.run_dir, step, model, optimizer, cfg, info,
                    extra={"data": {"windows": loader.position * info.world
                                    * cfg.train.micro_batch_size}},
                    keep_last=cfg.checkpoint.keep_last,
                )  # collective
        stops.restore()
        if is_main:
            logger.close()
            if stop:
                print(f"stopped on signal {stops.received} at step {step}; checkpoint saved. "
                      f"Continue with --resume", flush=True)
            elif cfg.log.plot:
                plot_loss(cfg.run_dir)
        return 0
    finally:
        tdist.shutdown(info)


def _autocast(cfg: RunConfig, info: tdist.DistInfo):
    # Under FSDP, bf16 comes from its MixedPrecisionPolicy (cast once per all-gather).
    if cfg.train.dtype == "bf16" and not info.distributed:
        return lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _tokenizer(cfg: RunConfig, manifest: dict, is_main: bool):
    from trainer.tokenizer import get_encoding

    bpe = cfg.data.tokenizer_file or manifest.get("tokenizer", {}).get("bpe_file", "")
    try:
        return get_encoding(bpe)
    except UserError as e:
        if is_main:
            print(f"warning: no tokenizer, so no text samples: {e}", file=sys.stderr)
        return None


def _print_plan(cfg: RunConfig, info: tdist.DistInfo, accum: int, model) -> None:
    n = cfg.model.num_params()
    print(
        f"model: {_shape(cfg.model)} ({n / 1e6:.2f}M parameters)\n"
        f"world {info.world} on {info.device.type} | sharding {cfg.parallel.sharding if info.distributed else 'single process'} "
        f"| dtype {cfg.train.dtype} | {cfg.train.global_batch_tokens:,} tokens/step = "
        f"{cfg.train.micro_batch_size} seqs x {cfg.seq_len} tokens x {info.world} ranks x "
        f"{accum} accumulation steps\n"
        f"run dir: {cfg.run_dir}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = config_mod.load(args.config, overrides)
        return run(cfg, resume=args.resume)
    except UserError as e:
        import os
        if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
            print(f"error: {e}", file=sys.stderr)
        return 2

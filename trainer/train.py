"""`python -m trainer`: train GPT-2, one process or many (torchrun, SLURM).

    python -m trainer --config configs/tiny.toml --data DIR --run-dir RUN [--max-steps N]
        [--resume] [--section.key=value ...]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capture.capturer import Capturer, NoCapture
from trainer import capture_setup, checkpoint
from trainer import config as config_mod
from trainer.cli import check_output_dir
from trainer import dist as tdist
from trainer.config import ConfigError, RunConfig, UserError
from trainer.data import DistributedLoader, TokenWindows, load_manifest
from trainer.evaluate import maybe_eval
from trainer.metrics import MetricsLogger, graphs_compiled, peak_flops, plot_loss
from trainer.model import GPT
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.parallelize import check_parallel, describe_groups, parallelize


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
    check_output_dir(run_dir, "--run-dir")
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


def check_data_matches_config(cfg: RunConfig, manifest: dict) -> None:
    """Synthetic token ids (trainer.synthetic: no tokenizer, a small vocabulary) under a
    config made for GPT-2's tokenizer: the run would train, on 0.1% of its unembedding, and
    its text samples, HellaSwag and decoded tokens would mean nothing. Refused."""
    if manifest.get("tokenizer", {}).get("name") != "none":
        return
    data_vocab = int(manifest.get("vocab_size", 0))
    wants_text = [k for k, v in (("data.tokenizer_file", cfg.data.tokenizer_file),
                                 ("eval.hellaswag_file", cfg.eval.hellaswag_file)) if v]
    if cfg.model.vocab_size >= 50257 > data_vocab or wants_text:
        why = (f"sets {', '.join(wants_text)}" if wants_text else
               f"has model.vocab_size {cfg.model.vocab_size} (GPT-2's tokenizer)")
        raise UserError(f"data dir {cfg.data.dir} holds synthetic token ids below {data_vocab} "
                        f"(no tokenizer), but this config {why}; train it with "
                        f"--model.vocab_size={data_vocab} and no tokenizer or HellaSwag file "
                        f"(as configs/induction.toml does), or use a data dir made by "
                        f"trainer.prepare")


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
        # Offloaded shards live in host memory: materialise them there.
        model.to_empty(device="cpu" if cfg.parallel.cpu_offload else info.device)
        model.init_weights(cfg.train.seed)
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
    # (With CPU offload the norm is computed in host memory: brought to the loss's device.)
    loss_val, norm_val = torch.stack([loss_sum / (accum * info.world),
                                      grad_norm.to(loss_sum.device)]).tolist()
    if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
        raise TrainingDiverged(f"loss {loss_val}, grad norm {norm_val}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_val, norm_val


@dataclass
class Run:
    """What the training loop works on, built once by `setup`."""
    cfg: RunConfig
    info: tdist.DistInfo
    model: GPT
    optimizer: torch.optim.Optimizer
    loader: DistributedLoader
    accum: int
    capturer: Capturer | NoCapture
    enc: Any  # tokenizer for samples (None when none could be loaded)
    hellaswag: list | None
    step: int = 0


def train_loop(r: Run, stops: StopSignals) -> int | None:
    """Train to max_steps; returns the signal that stopped it early, if one did."""
    cfg, info = r.cfg, r.info
    autocast = _autocast(cfg, info)
    logger = MetricsLogger(cfg, resume_step=r.step) if info.is_main else None
    try:
        while r.step < cfg.train.max_steps:
            lr = lr_at(r.step, cfg.optim, cfg.train.max_steps)
            graphs, t0 = graphs_compiled(), time.perf_counter()
            loss, grad_norm = train_step(r.model, r.optimizer, r.loader, r.accum, lr, cfg,
                                         info, autocast)
            r.step += 1
            record = step_record(r, loss, lr, grad_norm, time.perf_counter() - t0,
                                 compiled=graphs_compiled() > graphs)
            t1 = time.perf_counter()
            batch = capture_setup.live_batch(r.loader, r.accum) \
                if r.capturer.needs_batch(r.step) else None
            if r.capturer.maybe_capture(r.step, r.model, batch):
                record["capture_ms"] = (time.perf_counter() - t1) * 1e3  # training's stall
            record.update(maybe_eval(r.model, cfg, info, r.step, r.enc, autocast, r.hellaswag))
            if info.is_main:
                log_step(r, logger, record)
            stop = stops.requested(info)  # collective
            if stop or r.step % cfg.checkpoint.every == 0 or r.step == cfg.train.max_steps:
                save_checkpoint(r)
            if stop:
                return stops.received
        return None
    finally:
        if logger is not None:
            logger.close()


def step_record(r: Run, loss: float, lr: float, grad_norm: float, dt: float,
                compiled: bool = False) -> dict:
    tokens = r.cfg.train.global_batch_tokens
    rec = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
           "step_ms": dt * 1e3, "time": time.time()}
    if compiled:
        rec["compile"] = True  # this step's time includes compiling: no MFU for it
    dev = r.info.device
    if dev.type == "cuda":
        # The allocator's own counters: no device sync.
        rec["mem_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        torch.cuda.reset_peak_memory_stats(dev)
        peak = peak_flops(torch.cuda.get_device_name(dev), r.cfg.train.dtype)
        if peak and not compiled:
            rec["mfu"] = r.model.flops_per_token(r.cfg.seq_len) * tokens / dt / \
                (peak * r.info.world)
    return rec


def log_step(r: Run, logger: MetricsLogger, record: dict) -> None:
    logger.log(r.step, record, echo=r.step % r.cfg.log.every == 0 or "val_loss" in record)
    r.capturer.record_metrics(r.step, record)
    if "sample" in record:
        print(f"--- sample at step {r.step} ---\n{record['sample']}\n---", flush=True)


def save_checkpoint(r: Run) -> None:
    r.capturer.drain()  # every capture up to this step committed before the checkpoint
    windows = r.loader.position * r.info.world * r.cfg.train.micro_batch_size
    checkpoint.save(r.cfg.run_dir, r.step, r.model, r.optimizer, r.cfg, r.info,
                    extra={"data": {"windows": windows}},
                    keep_last=r.cfg.checkpoint.keep_last)  # collective


def setup(cfg: RunConfig, info: tdist.DistInfo, resume: bool) -> Run:
    is_main = info.is_main
    check_run_dir(cfg, resume)  # every rank checks before rank 0 writes anything
    manifest = load_manifest(cfg.data.dir)
    if int(manifest.get("vocab_size", 0)) > cfg.model.vocab_size:
        raise UserError(f"data dir {cfg.data.dir} has token ids up to "
                        f"{int(manifest['vocab_size']) - 1} but model.vocab_size is "
                        f"{cfg.model.vocab_size}; raise model.vocab_size to at least "
                        f"{manifest['vocab_size']}")
    check_data_matches_config(cfg, manifest)
    windows = TokenWindows(cfg.data.dir, "train", cfg.seq_len, seed=cfg.data.seed)
    TokenWindows(cfg.data.dir, "val", cfg.seq_len, shuffle=False)  # fail early if too short
    accum = grad_accum_steps(cfg, info.world)
    hellaswag_examples = None
    if cfg.eval.hellaswag_file:
        from trainer import hellaswag
        hellaswag_examples = hellaswag.load_examples(cfg.eval.hellaswag_file,
                                                     cfg.eval.hellaswag_examples)
    enc = _tokenizer(cfg, manifest, is_main)
    check_parallel(cfg.parallel, info)
    # the capture's settings, its plan against the budget, the store it appends to
    prep = capture_setup.prepare(cfg, info.world)
    # A collective, so also the barrier: every rank has checked before rank 0 writes.
    hosts = tdist.rank_hosts(info)
    if is_main:
        write_config(cfg)
        write_status(cfg.run_dir, "running", None, cfg.train.max_steps, hosts=hosts)

    model = build_model(cfg, info)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    loader = DistributedLoader(windows, cfg.train.micro_batch_size, info.rank, info.world)
    step, start_from = 0, -1
    if resume:
        meta = checkpoint.load(cfg.run_dir, model, optimizer, info)  # collective
        if meta is not None:
            step = start_from = meta["step"]
            windows_done = meta.get("data", {}).get("windows", 0)
            loader.load_state_dict(
                {"position": windows_done // (info.world * cfg.train.micro_batch_size)})
            if is_main:
                print(f"resumed from step {step} ({checkpoint.step_dir(cfg.run_dir, step)})",
                      flush=True)
        elif is_main:
            print(f"--resume: no checkpoint in {cfg.run_dir} yet; starting at step 0")
    if is_main:
        _print_plan(cfg, info, accum, hosts)
        if prep is not None:
            print(capture_setup.format_plan(prep.plan), flush=True)
    capturer = capture_setup.make_capturer(cfg, info, prep, resume_step=start_from)
    return Run(cfg, info, model, optimizer, loader, accum, capturer, enc, hellaswag_examples,
               step)


def run(cfg: RunConfig, resume: bool) -> int:
    info = tdist.init(cfg.parallel.device, cfg.parallel.cpu_offload)
    # Installed before setup, so a scheduler's signal during a long load is not lost.
    stops = StopSignals()
    status = "failed"
    r = None
    try:
        r = setup(cfg, info, resume)
        if r.step == 0:
            r.capturer.maybe_capture(0, r.model)  # the initial weights
        try:
            stopped_by = train_loop(r, stops)
        except TrainingDiverged as e:
            last = checkpoint.latest_step(cfg.run_dir)
            raise UserError(
                f"non-finite training at step {r.step + 1} ({e}); stopped. Last good "
                f"checkpoint: {'step ' + str(last) if last is not None else 'none'}. "
                f"Lower optim.lr or raise optim.warmup_steps, then --resume") from None
        except RuntimeError as e:
            peer = tdist.lost_peer(e)
            if not peer:
                raise
            # Another rank (or its node) died mid-collective: one line per surviving rank
            # instead of a traceback each; the launcher fails the job.
            last = checkpoint.latest_step(cfg.run_dir)
            print(f"error: rank {info.rank} on {socket.gethostname()} lost contact with "
                  f"another rank at step {r.step + 1} ({peer}): a rank or its "
                  f"node died. The last complete checkpoint is "
                  f"{'step ' + str(last) if last is not None else 'none'}; resubmit with "
                  f"--resume", file=sys.stderr, flush=True)
            return 1
        status = "stopped" if stopped_by else "finished"
        if info.is_main:
            if stopped_by:
                print(f"stopped on signal {signal.Signals(stopped_by).name} at step {r.step}; "
                      f"checkpoint saved. Continue with --resume", flush=True)
            elif cfg.log.plot:
                plot_loss(cfg.run_dir)
        return 0
    finally:
        stops.restore()
        if r is not None:
            r.capturer.close(status)  # drains the writer: every queued capture lands
        if info.is_main and _status_of(cfg.run_dir) == "running":  # this run got that far
            write_status(cfg.run_dir, status, r.step if r else None, cfg.train.max_steps,
                         signal=signal.Signals(stops.received).name if stops.received
                         else None)
        tdist.shutdown(info)


def write_status(run_dir: str, status: str, step: int | None, max_steps: int,
                 **extra) -> None:
    """RUN_DIR/status.json: running, then finished, stopped (on a signal, resumable) or
    failed. Launch scripts read it to decide on a requeue; a run killed outright leaves
    "running". The ranks' hosts, written with "running", are kept by the later writes."""
    hosts = _read_status(run_dir).get("hosts") if status != "running" else None
    rec = {"status": status, "step": step, "max_steps": max_steps, "time": time.time(),
           **scheduler_job(), **({"hosts": hosts} if hosts else {}), **extra}
    tmp = Path(run_dir) / "status.json.tmp"
    tmp.write_text(json.dumps(rec) + "\n")
    tmp.replace(Path(run_dir) / "status.json")


def _read_status(run_dir: str) -> dict:
    try:
        rec = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _status_of(run_dir: str) -> str | None:
    return _read_status(run_dir).get("status")


def scheduler_job() -> dict:
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return {"scheduler": "slurm", "job_id": env["SLURM_JOB_ID"],
                "restarts": int(env.get("SLURM_RESTART_COUNT", 0))}
    if "PBS_JOBID" in env:
        return {"scheduler": "pbs", "job_id": env["PBS_JOBID"]}
    return {}


def _autocast(cfg: RunConfig, info: tdist.DistInfo):
    # Under FSDP, bf16 comes from its MixedPrecisionPolicy (cast once per all-gather).
    if cfg.train.dtype == "bf16" and not info.distributed:
        return lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _tokenizer(cfg: RunConfig, manifest: dict, is_main: bool):
    from trainer.tokenizer import resolve

    if manifest.get("tokenizer", {}).get("name") == "none" and not cfg.data.tokenizer_file:
        return None  # synthetic token ids (trainer.synthetic): no text to sample
    try:
        return resolve(cfg=cfg)
    except UserError as e:
        if is_main:
            print(f"warning: no tokenizer, so no text samples: {e}", file=sys.stderr)
        return None


def _print_plan(cfg: RunConfig, info: tdist.DistInfo, accum: int, hosts: list[str]) -> None:
    n = cfg.model.num_params()
    groups = f" ({describe_groups(cfg.parallel, info, hosts)})" if info.distributed else ""
    print(
        f"model: {_shape(cfg.model)} ({n / 1e6:.2f}M parameters)\n"
        f"world {info.world} on {info.device.type} | sharding "
        f"{cfg.parallel.sharding + groups if info.distributed else 'single process'} "
        f"| dtype {cfg.train.dtype} | {cfg.train.global_batch_tokens:,} tokens/step = "
        f"{cfg.train.micro_batch_size} seqs x {cfg.seq_len} tokens x {info.world} ranks x "
        f"{accum} accumulation steps\n"
        f"run dir: {cfg.run_dir}",
        flush=True,
    )
    job = scheduler_job()
    if job:
        print(f"{job['scheduler']} job {job['job_id']}"
              + (f", restart {job['restarts']}" if "restarts" in job else ""), flush=True)

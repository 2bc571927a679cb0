"""What the trainer hands capture: the probe tokens from its data, the model's shape and hook
names, the distributed facts and the [capture] config; and the plan it prints at start and
for `--plan`. Capture itself (package `capture`) knows nothing of the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from capture import dynamics
from capture.capturer import Capturer, NoCapture, describe
from capture.plan import Plan, check_budget, format_plan, make_plan
from capture.spec import CaptureSpec, build_layout, resolve
from store import runs
from store.schema import Layout
from store.writer import StoreWriter
from trainer import dist as tdist
from trainer.config import RunConfig
from trainer.data import TokenWindows, load_manifest


def store_url(cfg: RunConfig) -> str:
    return runs.store_url(cfg.run_dir, cfg.capture.store)


def hook_names(cfg: RunConfig) -> list[str]:
    """The model's hook names, from a model built on the meta device (no memory)."""
    from trainer.model import GPT
    with torch.device("meta"):
        return list(GPT(cfg.model).hook_dict)


def capture_spec(cfg: RunConfig, world: int) -> CaptureSpec:
    """The capture settings checked against the model (CaptureConfigError, one line)."""
    return resolve(cfg.capture, cfg.model, hook_names(cfg), world, cfg.seq_len,
                   cfg.train.micro_batch_size)


def capture_plan(cfg: RunConfig, world: int, spec: CaptureSpec | None = None) -> Plan:
    spec = spec or capture_spec(cfg, world)
    return make_plan(cfg.capture, spec, cfg.model, cfg.train.max_steps, world)


def check(cfg: RunConfig, world: int) -> tuple[CaptureSpec, Plan]:
    """Before the run writes anything: the settings, and the plan against the budget."""
    spec = capture_spec(cfg, world)
    plan = capture_plan(cfg, world, spec)
    check_budget(plan, cfg.capture)
    return spec, plan


def plan_text(cfg: RunConfig, world: int) -> str:
    if not cfg.capture.enabled:
        return "capture is off (capture.enabled=false)\ntotal: 0 B"
    return format_plan(capture_plan(cfg, world))


def probe_tokens(cfg: RunConfig, T: int) -> torch.Tensor:
    """The probe set: P held-out (val) windows, the same at every capture and on resume."""
    c = cfg.capture
    val = TokenWindows(cfg.data.dir, "val", T, seed=c.probe_seed, shuffle=True)
    x, _ = val.get(np.arange(c.probe_seqs))
    return x


@dataclass
class Prepared:
    """A run's capture, ready to attach: checked against the model, the budget and the
    store it will append to, before the run writes anything."""

    spec: CaptureSpec
    plan: Plan
    layout: Layout
    url: str
    probe: torch.Tensor | None
    repeated: torch.Tensor | None


def prepare(cfg: RunConfig, world: int) -> Prepared | None:
    """Every rank: the settings, the plan against capture.budget, and whether an existing
    store at the capture URL can take this run's captures (one-line errors). Reads only."""
    c = cfg.capture
    if not c.enabled:
        return None
    spec, plan = check(cfg, world)
    probe = probe_tokens(cfg, spec.seq_len) if c.source == "probe" else None
    repeated = None
    if spec.repeat_half:
        # Random tokens from the ids the data can hold: a synthetic data dir's vocabulary
        # may be smaller than the model's.
        vocab = min(cfg.model.vocab_size, int(load_manifest(cfg.data.dir).get("vocab_size")
                                              or cfg.model.vocab_size))
        repeated = dynamics.repeated_tokens(c.repeat_seqs, spec.repeat_half, vocab,
                                            seed=c.probe_seed + 1)
    run = cfg.to_dict()
    layout = build_layout(spec, c, world, cfg.train.max_steps,
                          {"model": run["model"], "run": run},
                          None if probe is None else probe.numpy().astype(np.int32),
                          None if repeated is None else repeated.numpy().astype(np.int32))
    url = store_url(cfg)
    StoreWriter.check_compatible(url, layout)
    return Prepared(spec, plan, layout, url, probe, repeated)


def make_capturer(cfg: RunConfig, info: tdist.DistInfo, prep: Prepared | None,
                  resume_step: int):
    if prep is None:
        return NoCapture()
    if info.is_main:
        print(describe(prep.layout, prep.url, cfg.capture), flush=True)
    return Capturer(cfg.capture, prep.spec, prep.layout, info, prep.url, cfg.train.max_steps,
                    resume_step, cfg.to_dict()["model"], prep.probe, prep.repeated,
                    compiled=cfg.parallel.compile)


def live_batch(loader, accum: int) -> torch.Tensor:
    """This rank's first micro-batch of the step just taken (capture.source = "train")."""
    tokens, _ = loader.windows.get(loader.indices(max(loader.position - accum, 0)))
    return tokens

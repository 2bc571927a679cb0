"""The capture plan: for every tier, how many captures, the bytes of one and of the whole
run, checked against `capture.budget` before anything is written. `python -m trainer
--config FILE --plan` prints it; training prints it at start.

Bytes are uncompressed, as the arrays are laid out (docs/store.md): an upper bound on the
disk a run takes. Activations and snapshots are stored uncompressed, so for them it is the
size on disk; the small arrays compress (zstd) below it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from capture.config import CaptureConfig, CaptureConfigError, budget_bytes
from capture.schedule import Schedule
from capture.spec import CaptureSpec, ModelDims, build_layout

SNAPSHOT_HEADER = 64 << 10  # safetensors' JSON header and config.json: a generous bound


@dataclass
class TierPlan:
    tier: str
    steps: list[int]
    per_capture: int
    cadence: str

    @property
    def total(self) -> int:
        return self.per_capture * len(self.steps)


@dataclass
class Plan:
    tiers: list[TierPlan]
    fixed: int            # probes and per-step metrics
    budget: int | None
    max_steps: int
    world: int

    @property
    def total(self) -> int:
        return sum(t.total for t in self.tiers) + self.fixed


def snapshot_bytes(dims: ModelDims) -> int:
    """A bf16/fp16 snapshot: two bytes per parameter (a tied unembedding once)."""
    return 2 * dims.num_params() + SNAPSHOT_HEADER


def make_plan(c: CaptureConfig, spec: CaptureSpec, dims: ModelDims, max_steps: int,
              world: int) -> Plan:
    P, T = spec.n_seqs, spec.seq_len
    stand_in = np.zeros((P, T), np.int32) if c.source == "probe" else None
    rep = np.zeros((max(c.repeat_seqs, 1), 2 * max(spec.repeat_half, 1)), np.int32)
    lay = build_layout(spec, c, world, max_steps, {}, stand_in, rep)
    sched = Schedule.of(c, max_steps)
    summary = lay.bytes_per_capture("summary")
    full = lay.bytes_per_capture("full")
    tiers = [TierPlan("summary", sched.steps("summary"), summary, sched.describe("summary")),
             TierPlan("full", sched.steps("full"), full, sched.describe("full")),
             TierPlan("snapshot", sched.steps("snapshot"), snapshot_bytes(dims),
                      sched.describe("snapshot"))]
    return Plan(tiers, lay.bytes_fixed(max_steps), budget_bytes(c.budget), max_steps, world)


def fmt_bytes(n: float) -> str:
    """Decimal units, as capture.budget reads them (1 GB = 10^9 bytes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_plan(plan: Plan) -> str:
    """The table; its last line is `total: <number> <unit>`."""
    rows = [f"capture plan for {plan.max_steps:,} steps (world {plan.world}; uncompressed; a "
            f"full capture also writes the summary):",
            f"  {'tier':<9}{'captures':>9}{'per capture':>14}{'for the run':>14}  when"]
    for t in plan.tiers:
        rows.append(f"  {t.tier:<9}{len(t.steps):>9,}{fmt_bytes(t.per_capture):>14}"
                    f"{fmt_bytes(t.total):>14}  {t.cadence}")
    rows.append(f"  {'per run':<9}{'':>9}{'':>14}{fmt_bytes(plan.fixed):>14}  probes, "
                f"metrics per step")
    if plan.budget is not None:
        rows.append(f"  budget {fmt_bytes(plan.budget)} (capture.budget): "
                    f"{100 * plan.total / plan.budget:.0f}% used")
    rows.append(f"total: {fmt_bytes(plan.total)}")
    return "\n".join(rows)


_THIN = {"summary": "raise capture.every ({every}) or narrow capture.summary_hooks",
         "full": "raise capture.full_every ({full_every}), narrow capture.hooks or lower "
                 "capture.attn_len / attn_seqs",
         "snapshot": "raise capture.snapshot_every ({snapshot_every})"}


def check_budget(plan: Plan, c: CaptureConfig) -> None:
    """CaptureConfigError (one line) when the plan does not fit capture.budget."""
    if plan.budget is None or plan.total <= plan.budget:
        return
    big = max(plan.tiers, key=lambda t: t.total)
    hint = _THIN[big.tier].format(every=c.every, full_every=c.full_every,
                                  snapshot_every=c.snapshot_every)
    raise CaptureConfigError(
        f"the capture plan needs {fmt_bytes(plan.total)}, over capture.budget "
        f"({c.budget}); the {big.tier} tier takes {fmt_bytes(big.total)} "
        f"({len(big.steps)} x {fmt_bytes(big.per_capture)}): {hint}, or raise "
        f"capture.budget (see --plan)")

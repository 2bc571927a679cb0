"""When each tier is taken: step 0 (the initial weights), the early steps 1, 2, 4, 8, ...
below the tier's cadence (learning is fastest early: Pythia's checkpoints are spaced the
same way), every multiple of the cadence, and the final step. A full capture is also a
summary capture. Nothing is fixed in the store: a resumed run may change every cadence and
max_steps, and its captures are appended."""

from __future__ import annotations

from dataclasses import dataclass


def cadence_steps(every: int, max_steps: int, log_early: bool, at_init: bool) -> list[int]:
    """Steps 0..max_steps of one cadence (empty when `every` is 0)."""
    return [s for s in range(max_steps + 1) if _hit(s, every, max_steps, log_early, at_init)]


def _hit(step: int, every: int, max_steps: int, log_early: bool, at_init: bool) -> bool:
    if every <= 0:
        return False
    if step == 0:
        return at_init
    if step == max_steps or step % every == 0:
        return True
    return log_early and step < every and step & (step - 1) == 0


@dataclass(frozen=True)
class Schedule:
    every: int              # summary
    full_every: int         # 0: no full captures
    snapshot_every: int     # 0: no snapshots
    max_steps: int
    log_early: bool = True
    at_init: bool = True

    @classmethod
    def of(cls, c, max_steps: int) -> "Schedule":
        """From a CaptureConfig."""
        return cls(c.every, c.full_every, c.snapshot_every, max_steps, c.log_early,
                   c.at_init)

    def _at(self, step: int, every: int) -> bool:
        return _hit(step, every, self.max_steps, self.log_early, self.at_init)

    def full(self, step: int) -> bool:
        return self._at(step, self.full_every)

    def summary(self, step: int) -> bool:
        return self._at(step, self.every) or self.full(step)

    def snapshot(self, step: int) -> bool:
        return self._at(step, self.snapshot_every)

    def steps(self, tier: str) -> list[int]:
        """The steps 0..max_steps of "summary" (every capture), "full" or "snapshot"."""
        test = {"summary": self.summary, "full": self.full, "snapshot": self.snapshot}[tier]
        return [s for s in range(self.max_steps + 1) if test(s)]

    def describe(self, tier: str) -> str:
        every = {"summary": self.every, "full": self.full_every,
                 "snapshot": self.snapshot_every}[tier]
        if every <= 0:
            return "off"
        parts = [f"every {every:,} steps"]
        if self.log_early and every > 1:
            early = [s for s in (1 << i for i in range(40)) if s < min(every, self.max_steps)]
            if early:
                parts.append(f"{early[0]}, {early[1]}, ..., {early[-1]}" if len(early) > 3
                             else ", ".join(map(str, early)))
        if self.at_init:
            parts.append("step 0")
        parts.append("the last step")
        return ", ".join(parts)

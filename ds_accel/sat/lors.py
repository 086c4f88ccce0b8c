"""LORS, the Ladder Omission Rate Scheduler of Sparsity-Accelerated Training (Ma et al., 2024).

Training runs in two stages. Stage 1, the first S1 = floor(stage1_fraction * total_steps) steps, omits
at the constant rate r. Stage 2, the remaining L = total_steps - S1 steps, steps the rate down a ladder
to 0 so that training ends dense:

    rung(step) = ceil((step - S1 + 1) * rungs / L) - 1           (rungs of equal length, +-1 step)
    rate(step) = r * (rungs - 1 - rung) / (rungs - 1)            (rungs = 1: rate 0 in all of stage 2)

so the rungs are equally spaced from r down to 0 and the last one is dense; r = 0.5, rungs = 4 gives
0.5, 1/3, 1/6, 0 over four quarters of stage 2 (the first rung continues stage 1's rate). The last
step of stage 2 is always on the dense rung, even when stage 2 has fewer steps than rungs (then the
first rungs are skipped). Comparison
schedules for the benchmark: "constant" (r at every step) and "linear" (r at the start of stage 2
down to exactly 0 at the last step: r * (L - 1 - (step - S1)) / (L - 1)). At step >= total_steps the
rate is 0 for every schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("ladder", "constant", "linear")


@dataclass(frozen=True)
class LORS:
    """Omission rate per step; see the module docstring for the formulas.

    total_steps: steps of the training run (>= 1).
    omission_rate: r, the stage-1 rate, in [0, 1).
    stage1_fraction: fraction of the steps at the constant rate r, in [0, 1].
    rungs: number of equal-length rungs of the stage-2 ladder, the last one dense (>= 1).
    schedule: "ladder" (LORS), "constant" or "linear".
    """

    total_steps: int
    omission_rate: float = 0.5
    stage1_fraction: float = 0.5
    rungs: int = 4
    schedule: str = "ladder"

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if not 0.0 <= self.omission_rate < 1.0:
            raise ValueError(f"omission_rate must be in [0, 1), got {self.omission_rate!r}")
        if not 0.0 <= self.stage1_fraction <= 1.0:
            raise ValueError(f"stage1_fraction must be in [0, 1], got {self.stage1_fraction!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.rungs, int) or self.rungs < 1:
            raise ValueError(f"rungs must be an integer >= 1, got {self.rungs!r}")

    @property
    def stage1_steps(self) -> int:
        """S1: steps at the constant rate before the ladder starts."""
        return math.floor(self.stage1_fraction * self.total_steps)

    def rate(self, step: int) -> float:
        """Omission rate of training step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        r, start = self.omission_rate, self.stage1_steps
        if step >= self.total_steps:
            return 0.0
        if self.schedule == "constant" or step < start:
            return r
        into, length = step - start, self.total_steps - start
        if self.schedule == "linear":
            return r * (length - 1 - into) / (length - 1) if length > 1 else 0.0
        rung = -(-(into + 1) * self.rungs // length) - 1
        return r * (self.rungs - 1 - rung) / (self.rungs - 1) if self.rungs > 1 else 0.0


__all__ = ["LORS", "SCHEDULES"]

"""The V-cycle as a list of stages: level 1, 2, ..., N, ..., 2, 1 with their step ranges.

Each stage trains one level for a contiguous range of global steps. Moving to a deeper level
coalesces; moving back up de-coalesces and interpolates with the weights that level had when
the cycle left it. Each stage carries its level's LR multiplier; the schedule itself is
``ds_accel.multilevel.schedule``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from ..config import ConfigError, MultiLevelConfig
from .operators import coalesced_config


@dataclass(frozen=True)
class Stage:
    index: int  # position in the V-cycle, 0-based
    level: int  # 1 = full model
    start: int  # first global step of the stage
    end: int  # one past the last global step
    config: LlamaConfig  # the model shape at this level
    lr_scale: float

    @property
    def steps(self) -> int:
        return self.end - self.start


def level_configs(conf: LlamaConfig, ml: MultiLevelConfig) -> list[LlamaConfig]:
    """Configs of levels 1..N; a shape that cannot be coalesced fails here, before any training."""
    configs = [conf]
    for level in range(2, ml.levels + 1):
        try:
            configs.append(coalesced_config(configs[-1], ml.width_factor, ml.depth_factor))
        except ValueError as err:
            raise ConfigError(f"multilevel.levels: level {level} cannot be built from the model: {err}") from None
    return configs


def plan(conf: LlamaConfig, ml: MultiLevelConfig | None, total_steps: int) -> list[Stage]:
    """Stages of the run; without multi-level training one stage of level 1 covers every step."""
    if ml is None or not ml.enabled:
        return [Stage(0, 1, 0, total_steps, conf, 1.0)]
    configs = level_configs(conf, ml)
    levels = list(range(1, ml.levels + 1)) + list(range(ml.levels - 1, 0, -1))
    bounds, acc = [0], 0.0
    for frac in ml.step_fractions:
        acc += frac
        bounds.append(round(acc * total_steps))
    bounds[-1] = total_steps
    stages = [Stage(i, lv, bounds[i], bounds[i + 1], configs[lv - 1], ml.lr_scale[lv - 1])
              for i, lv in enumerate(levels)]
    short = [s for s in stages if s.steps < 1]
    if short:
        raise ConfigError(f"multilevel.step_fractions: stage {short[0].index} (level {short[0].level}) gets no "
                          f"steps out of run.total_steps={total_steps}; raise total_steps or the fraction")
    short = [s for s in stages[1:] if s.steps <= ml.transition_warmup]
    if short:
        raise ConfigError(f"multilevel.transition_warmup: {ml.transition_warmup} warm-up steps, but stage "
                          f"{short[0].index} (level {short[0].level}) has only {short[0].steps} of "
                          f"run.total_steps={total_steps}; lower it or raise total_steps")
    return stages

"""The learning rate of a V-cycle run: per stage or over the run, with the authors' schedule as a preset.

Every stage trains one level from that level's peak, ``optim.lr * multilevel.lr_scale[level - 1]``
(smaller levels take a higher LR: x4 in the authors' GPT-2 example). Within a schedule of n steps
with w warm-up steps, step t (0-based) runs at the peak times

    warm-up   (t + 1) / w                                        t < w
    decay     floor + (1 - floor) * d(p),  p = (t - w) / (n - w)   t >= w
              d = (1 + cos(pi p)) / 2 (cosine) or 1 - p (linear)

so the last warm-up step and the first decay step run at the peak, and no step runs at LR 0.
``multilevel.lr_schedule`` says what a schedule spans:

- ``authors``: the authors' code, where every stage is a separate run with the HF Trainer's default
  schedule (linear, to 0): the first stage is all warm-up (w = n), so the LR is at its peak when
  coalescing; every later stage decays from its level's peak to 0 (floor 0, linear unless
  ``lr_decay`` says otherwise) with ``transition_warmup`` warm-up steps (the authors: none).
- ``stage``: every stage decays afresh from its level's peak to ``optim.min_lr_ratio`` of it; the
  first stage warms up over ``optim.warmup_steps``, the later ones over ``transition_warmup``.
- ``run``: one schedule over the whole run (``optim.warmup_steps``, floor ``optim.min_lr_ratio``),
  scaled by the level's ``lr_scale``; a transition does not restart it.

``lr_decay: auto`` is linear for ``authors`` and cosine otherwise. Without the V-cycle the run has
one stage and the ``run`` schedule with cosine decay.
"""

from __future__ import annotations

import math

from ..config import MultiLevelConfig, OptimConfig
from .vcycle import Stage


def lr_factor(t: int, steps: int, warmup: int, decay: str, floor: float) -> float:
    """LR over the peak at step ``t`` of a schedule of ``steps`` steps (see the module docstring)."""
    if t < warmup:
        return (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def decay_shape(ml: MultiLevelConfig) -> str:
    """``lr_decay`` with ``auto`` resolved: linear for the authors' schedule, cosine otherwise."""
    if ml.lr_decay != "auto":
        return ml.lr_decay
    return "linear" if ml.lr_schedule == "authors" else "cosine"


def lr_at(optim: OptimConfig, ml: MultiLevelConfig, total_steps: int, stage: Stage, step: int) -> float:
    """The LR of global step ``step``, which ``stage`` trains."""
    if not ml.enabled or ml.lr_schedule == "run":
        decay = decay_shape(ml) if ml.enabled else "cosine"
        factor = lr_factor(step, total_steps, optim.warmup_steps, decay, optim.min_lr_ratio)
    else:
        authors = ml.lr_schedule == "authors"
        first_warmup = stage.steps if authors else optim.warmup_steps
        warmup = first_warmup if stage.index == 0 else ml.transition_warmup
        factor = lr_factor(step - stage.start, stage.steps, warmup, decay_shape(ml),
                           0.0 if authors else optim.min_lr_ratio)
    return optim.lr * stage.lr_scale * factor


__all__ = ["decay_shape", "lr_at", "lr_factor"]

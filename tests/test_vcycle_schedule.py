"""The V-cycle's LR schedules (``ds_accel.multilevel.schedule``) against values worked out by hand at
the first and last step of every stage (and the ends of warm-ups).

Layout used throughout: 20 steps, step_fractions [0.25, 0.35, 0.4] -> stages [0, 5), [5, 12), [12, 20)
at levels 1, 2, 1; optim.lr 1e-3, lr_scale [1, 4] (level 2's peak 4e-3), optim.warmup_steps 3,
optim.min_lr_ratio 0.1. Decay within a schedule of n steps after w warm-up steps: p = (t - w) / (n - w).
"""

from math import cos, pi

import pytest

from ds_accel.config import ConfigError
from ds_accel.models import llama_config
from ds_accel.multilevel.vcycle import plan
from ds_accel.trainer import lr_at

ML = {"enabled": True, "step_fractions": [0.25, 0.35, 0.4], "lr_scale": [1.0, 4.0]}
OPTIM = {"lr": 1e-3, "warmup_steps": 3, "min_lr_ratio": 0.1}


def _lrs(tiny_cfg, **ml):
    cfg = tiny_cfg(multilevel={**ML, **ml}, run={"total_steps": 20}, optim=OPTIM)
    stages = plan(llama_config("tiny", 512), cfg.multilevel, 20)
    assert [(s.start, s.end, s.level) for s in stages] == [(0, 5, 1), (5, 12, 2), (12, 20, 1)]
    return {t: lr_at(cfg, t, next(s for s in stages if s.start <= t < s.end)) for t in range(20)}


def _check(lrs, expected):
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, rel=1e-12, abs=1e-15), step


def test_authors_schedule(tiny_cfg):
    """Stage 1 all warm-up, (t + 1) / 5: 0.2e-3 at step 0, the peak 1e-3 at step 4, when coalescing.
    Level 2 from its peak 4e-3 linearly to 0 over 7 steps: step 11 is p = 6/7, 4e-3 / 7. Level 1 again
    from 1e-3 over 8 steps: step 19 is p = 7/8, 1e-3 / 8. optim.warmup_steps and min_lr_ratio play no role."""
    _check(_lrs(tiny_cfg, lr_schedule="authors"), {
        0: 0.2e-3, 1: 0.4e-3, 4: 1e-3,
        5: 4e-3, 6: 4e-3 * 6 / 7, 11: 4e-3 / 7,
        12: 1e-3, 19: 1e-3 / 8,
    })


def test_authors_schedule_with_warmup_after_transitions(tiny_cfg):
    """transition_warmup 2: step 5 at 4e-3 / 2, step 6 at the peak, then linear over the 5 remaining steps
    (step 7 p = 0, step 11 p = 4/5: 4e-3 / 5); level 1 again: 0.5e-3, 1e-3, then step 19 at p = 5/6."""
    _check(_lrs(tiny_cfg, lr_schedule="authors", transition_warmup=2), {
        0: 0.2e-3, 4: 1e-3,
        5: 2e-3, 6: 4e-3, 7: 4e-3, 11: 4e-3 / 5,
        12: 0.5e-3, 13: 1e-3, 14: 1e-3, 19: 1e-3 / 6,
    })


def test_authors_schedule_with_cosine_decay(tiny_cfg):
    """lr_decay cosine replaces the linear shape, still to 0: step 11 at 4e-3 (1 + cos(6 pi / 7)) / 2."""
    _check(_lrs(tiny_cfg, lr_schedule="authors", lr_decay="cosine"), {
        4: 1e-3, 5: 4e-3, 11: 4e-3 * (1 + cos(6 * pi / 7)) / 2, 12: 1e-3, 19: 1e-3 * (1 + cos(7 * pi / 8)) / 2,
    })


def test_stage_schedule(tiny_cfg):
    """Stage 1 warms up over optim.warmup_steps (1/3, 2/3, 1 of 1e-3), then cosine to 0.1 of the peak over
    its last 2 steps (step 4: p = 1/2, 0.1 + 0.9 / 2 = 0.55). Every later stage starts at its level's
    peak with no warm-up: step 11 at 4e-3 (0.1 + 0.45 (1 + cos(6 pi / 7))), step 19 at p = 7/8."""
    _check(_lrs(tiny_cfg, lr_schedule="stage"), {
        0: 1e-3 / 3, 2: 1e-3, 3: 1e-3, 4: 0.55e-3,
        5: 4e-3, 11: 4e-3 * (0.1 + 0.45 * (1 + cos(6 * pi / 7))),
        12: 1e-3, 19: 1e-3 * (0.1 + 0.45 * (1 + cos(7 * pi / 8))),
    })


def test_stage_schedule_linear_with_warmup_after_transitions(tiny_cfg):
    """lr_decay linear, transition_warmup 2: step 4 at 0.1 + 0.9 (1 - 1/2) = 0.55 of 1e-3 (linear and
    cosine agree at the midpoint); step 5 at 2e-3, step 6 at 4e-3, step 11 at p = 4/5: 4e-3 (0.1 + 0.9 / 5)."""
    _check(_lrs(tiny_cfg, lr_schedule="stage", lr_decay="linear", transition_warmup=2), {
        0: 1e-3 / 3, 3: 1e-3, 4: 0.55e-3,
        5: 2e-3, 6: 4e-3, 7: 4e-3, 11: 4e-3 * (0.1 + 0.9 / 5),
        12: 0.5e-3, 13: 1e-3, 19: 1e-3 * (0.1 + 0.9 / 6),
    })


def test_run_schedule_spans_the_run_and_scales_per_level(tiny_cfg):
    """One warm-up (3 steps) + cosine over 20 steps, p = (t - 3) / 17, times the level's lr_scale:
    a transition moves to the other level's multiple of the same curve."""
    def run(t):
        return 0.1 + 0.45 * (1 + cos(pi * (t - 3) / 17))

    _check(_lrs(tiny_cfg, lr_schedule="run"), {
        0: 1e-3 / 3, 2: 1e-3, 3: 1e-3, 4: 1e-3 * run(4),
        5: 4e-3 * run(5), 11: 4e-3 * run(11), 12: 1e-3 * run(12), 19: 1e-3 * run(19),
    })


def test_dense_runs_one_warmup_and_cosine(tiny_cfg):
    from ds_accel.multilevel.vcycle import plan

    cfg = tiny_cfg(run={"total_steps": 20}, optim=OPTIM)
    (stage,) = plan(llama_config("tiny", 512), cfg.multilevel, 20)
    assert lr_at(cfg, 0, stage) == pytest.approx(1e-3 / 3)
    assert lr_at(cfg, 19, stage) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + cos(pi * 16 / 17))))


def test_schedule_errors_name_the_field(tiny_cfg):
    with pytest.raises(ConfigError, match="multilevel.transition_warmup: lr_schedule run"):
        tiny_cfg(multilevel={**ML, "lr_schedule": "run", "transition_warmup": 2})
    with pytest.raises(ConfigError, match="multilevel.transition_warmup: must be >= 0"):
        tiny_cfg(multilevel={**ML, "transition_warmup": -1})
    with pytest.raises(ConfigError, match="multilevel.lr_decay"):
        tiny_cfg(multilevel={**ML, "lr_decay": "step"})
    cfg = tiny_cfg(multilevel={**ML, "transition_warmup": 7}, run={"total_steps": 20})
    with pytest.raises(ConfigError, match="multilevel.transition_warmup: 7 warm-up steps, but stage 1"):
        plan(llama_config("tiny", 512), cfg.multilevel, 20)

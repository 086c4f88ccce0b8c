"""Compute budgets (``ds_accel.budget``) against FLOPs worked out by hand for the tiny preset.

The tiny preset at a 512-token vocabulary, 32-token blocks and 4 blocks a step (128 tokens): hidden
h = 64, head size 16, 4 query / 2 KV heads, MLP m = 176, 4 layers, tied embeddings. Forward FLOPs per
token and layer (``ds_accel.flops``): projections 2*64*16*(4 + 2*2) + 2*4*16*64 = 24,576, attention
4*32*16*4 = 8,192, MLP 6*64*176 = 67,584, together 100,352; the LM head 2*64*512 = 65,536 once. A
training step is 3 x forward: 3 * (4 * 100,352 + 65,536) * 128 = 179,306,496 FLOPs.

The V-cycle's level 2 halves width and depth: h 32, 2 / 1 heads, m 88, 2 layers: per layer
2*32*16*(2 + 2) + 2*2*16*32 + 4*32*16*2 + 6*32*88 = 27,136, head 2*32*512 = 32,768, a step
3 * (2 * 27,136 + 32,768) * 128 = 33,423,360 FLOPs.
"""

import pytest

from conftest import tiny_overrides
from ds_accel.budget import run_flops, steps_for_budget
from ds_accel.config import ConfigError, from_dict

DENSE_STEP = 179_306_496
SMALL_STEP = 33_423_360
VOCAB = 512


def _cfg(tmp_path, **extra):
    return from_dict(tiny_overrides(tmp_path, **extra))


def test_dense_steps_are_the_budget_over_one_step(tmp_path):
    cfg = _cfg(tmp_path)
    assert run_flops(cfg, VOCAB, 1) == DENSE_STEP
    assert run_flops(cfg, VOCAB, 100, dp_world=2) == 200 * DENSE_STEP  # two ranks: twice the tokens a step
    assert steps_for_budget(cfg, VOCAB, 100 * DENSE_STEP) == 100
    assert steps_for_budget(cfg, VOCAB, 100.5 * DENSE_STEP) == 100
    assert steps_for_budget(cfg, VOCAB, 100 * DENSE_STEP - 1) == 99


def test_vcycle_gets_the_steps_its_cheaper_small_level_pays_for(tmp_path):
    """Dense's 100 steps buy the V-cycle [0.25, 0.25, 0.5] 125 steps. At T = 125 the stage boundaries are
    round(31.25) = 31 and round(62.5) = 62 (half to even): 31 + 63 = 94 large steps and 31 small ones,
    94 * 179,306,496 + 31 * 33,423,360 = 17,890,934,784 <= 17,930,649,600. At T = 126 they are
    round(31.5) = 32 and 63: 95 large and 31 small steps, 18,070,241,280 FLOPs, over the budget."""
    cfg = _cfg(tmp_path, multilevel={"enabled": True, "step_fractions": [0.25, 0.25, 0.5]})
    assert run_flops(cfg, VOCAB, 125) == 17_890_934_784 == 94 * DENSE_STEP + 31 * SMALL_STEP
    assert run_flops(cfg, VOCAB, 126) == 18_070_241_280
    assert steps_for_budget(cfg, VOCAB, 100 * DENSE_STEP) == 125


def test_sat_counts_the_kept_units_of_each_lors_rung(tmp_path):
    """LORS r = 0.5, stage 1 half, 4 rungs over T = 16: 8 steps at 0.5, then 2 each at 0.5, 1/3, 1/6, 0.
    Kept (query heads, KV heads, channels) = ceil((1 - r) n): 0.5 -> (2, 1, 88); 1/3 -> (3, 2, 118);
    1/6 -> (4, 2, 147). Forward per token and layer: 0.5: 2*64*16*4 + 2*2*16*64 + 4*32*16*2 + 6*64*88
    = 50,176; 1/3: 2*64*16*7 + 2*3*16*64 + 4*32*16*3 + 6*64*118 = 71,936; 1/6: 24,576 + 8,192 + 56,448
    = 89,216; dense 100,352. Per step and token with the head: 266,240 / 353,280 / 422,400 / 466,944.
    The run: (10 * 266,240 + 2 * 353,280 + 2 * 422,400 + 2 * 466,944) * 3 * 128 = 1,976,696,832."""
    cfg = _cfg(tmp_path, sat={"enabled": True, "omission_rate": 0.5, "stage1_fraction": 0.5, "rungs": 4})
    assert run_flops(cfg, VOCAB, 16) == 1_976_696_832
    t = steps_for_budget(cfg, VOCAB, 1_976_696_832)
    assert t == 16


def test_vcycle_with_sat_sums_rate_and_level_step_by_step(tmp_path):
    """V-cycle [0.25, 0.25, 0.5] with LORS over T = 16: steps 0-3 large at 0.5 (266,240 per token), 4-7
    small at 0.5, steps 8-15 large at 0.5, 0.5, 1/3, 1/3, 1/6, 1/6, 0, 0. The small level at 0.5 keeps
    1 query head, 1 KV head (ceil(0.5)) and 44 channels: per layer 2*32*16*3 + 2*1*16*32 + 4*32*16
    + 6*32*44 = 14,592, with 2 layers and the head 61,952 per token. The run:
    (6 * 266,240 + 4 * 61,952 + 2 * 353,280 + 2 * 422,400 + 2 * 466,944) * 3 * 128 = 1,662,910,464."""
    cfg = _cfg(tmp_path, multilevel={"enabled": True, "step_fractions": [0.25, 0.25, 0.5]},
               sat={"enabled": True, "omission_rate": 0.5, "stage1_fraction": 0.5, "rungs": 4})
    assert run_flops(cfg, VOCAB, 16) == 1_662_910_464
    assert steps_for_budget(cfg, VOCAB, 1_662_910_464) == 16
    assert steps_for_budget(cfg, VOCAB, 1_662_910_463) == 15


def test_budget_too_small_for_the_schedule_is_a_clear_error(tmp_path):
    """Three stages need at least 3 steps; a budget below even one dense step can't buy them."""
    cfg = _cfg(tmp_path, multilevel={"enabled": True})
    with pytest.raises(ConfigError, match="flops_budget"):
        steps_for_budget(cfg, VOCAB, 2 * DENSE_STEP)
    with pytest.raises(ConfigError, match="flops_budget: must be > 0"):
        steps_for_budget(cfg, VOCAB, 0.0)


def test_the_trainer_spends_what_the_budget_counts(tmp_path):
    """The trainer's own FLOPs count of a V-cycle + SAT run (kv_group granularity: every kept query head's
    KV head is kept, so the count is exact) equals ``run_flops`` before the run."""
    from ds_accel.trainer import train

    cfg = _cfg(tmp_path, run={"total_steps": 8, "eval_every": 8},
               multilevel={"enabled": True, "step_fractions": [0.25, 0.25, 0.5]},
               sat={"enabled": True, "granularity": "kv_group"})
    assert train(cfg)["flops"] == run_flops(cfg, VOCAB)

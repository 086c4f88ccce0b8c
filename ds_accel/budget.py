"""Compute budgets: the step count at which a method's run spends a given number of training FLOPs.

Users pay for compute, not steps. A V-cycle that spends half its steps on a level costing 1/8 per step
uses far less compute than dense training for the same steps, so comparing at equal steps hands dense
the larger budget. An equal-compute comparison gives every method the step count at which its own
run spends the budget, decided before the run, so that the V-cycle's stages
(``multilevel.step_fractions``) and SAT's LORS rungs (``sat.stage1_fraction``) are laid over that
step count as they will be trained.

The FLOPs of a run are the trainer's own count (``ds_accel.flops.train_flops``, forward + backward),
summed over its steps: step s trains the V-cycle level of the stage holding s
(``multilevel.vcycle.plan``) at SAT's omission rate for s (``sat.LORS``), computing the kept heads and
channels of every layer (``planner.kept_width``, the widths ``ds-accel plan`` counts). For a V-cycle
alone this is ``planner.vcycle_flops_ratio`` times dense, for SAT alone ``planner.lors_flops_ratio``
times dense; with both, the rate varies within each stage, so the steps are summed one by one.

Exact for dense, V-cycle, and SAT without GQA. Under GQA with ``sat.granularity: head`` the run may
compute more KV heads than ``kept_width`` counts (the kept query heads can need more than
ceil((1 - r) K) KV heads; ``kept_width`` counts the fewest), so it may spend slightly more than the
budget: the KV projections are a small part of a step.
"""

from __future__ import annotations

from dataclasses import replace

from .config import ConfigError, TrainConfig
from .flops import train_flops
from .models import model_config
from .multilevel.vcycle import level_configs, plan
from .planner import kept_width
from .sat import LORS


def tokens_per_step(cfg: TrainConfig, dp_world: int = 1) -> int:
    """Tokens of one optimizer step over all data-parallel ranks (what the trainer counts)."""
    o = cfg.optim
    return o.micro_batch_size * o.grad_accum * dp_world * cfg.data.seq_len


def run_flops(cfg: TrainConfig, vocab_size: int, total_steps: int | None = None, dp_world: int = 1) -> float:
    """Training FLOPs of ``cfg``'s run over ``total_steps`` steps (default ``run.total_steps``).

    ``vocab_size``: the tokenizer's (``data.Corpus.vocab_size``; a preset model's vocabulary follows it);
    ``dp_world``: data-parallel ranks, each training ``micro_batch_size * grad_accum`` blocks a step.
    Raises ConfigError when the V-cycle or LORS can't be laid over ``total_steps``.
    """
    steps = cfg.run.total_steps if total_steps is None else total_steps
    stages = plan(model_config(cfg.model, vocab_size), cfg.multilevel, steps)
    tokens, seq_len = tokens_per_step(cfg, dp_world), cfg.data.seq_len
    sat = cfg.sat if cfg.sat.enabled else None
    if sat is not None:
        try:
            lors = LORS(steps, sat.omission_rate, sat.stage1_fraction, sat.rungs, sat.schedule)
        except ValueError as err:
            raise ConfigError(f"sat: {err}; change sat.rungs/sat.stage1_fraction or the budget") from None
    cost: dict[tuple[int, float], float] = {}
    total = 0.0
    for stage in stages:
        for step in range(stage.start, stage.end):
            rate = lors.rate(step) if sat is not None else 0.0
            if (stage.level, rate) not in cost:
                widths = None if sat is None else [kept_width(stage.config, rate, sat)] * stage.config.num_hidden_layers
                cost[stage.level, rate] = train_flops(stage.config, tokens, seq_len, widths)
            total += cost[stage.level, rate]
    return total


def steps_for_budget(cfg: TrainConfig, vocab_size: int, flops_budget: float, dp_world: int = 1) -> int:
    """A step count T whose run spends the budget: ``run_flops(T) <= flops_budget < run_flops(T + 1)``.

    Everything but ``run.total_steps`` is taken from ``cfg``: set T as ``run.total_steps`` and the run
    spends the budget to within one step's FLOPs. A run's FLOPs grow with its step count up to the
    rounding of stage and rung boundaries (a boundary that moves by one step moves that step to another
    level or rate), so T is a step count where the spending crosses the budget, found by bracketing and
    bisection. Raises ConfigError when the budget can't pay for the shortest step count the V-cycle
    can be laid over.
    """
    if not flops_budget > 0:
        raise ConfigError(f"flops_budget: must be > 0, got {flops_budget!r}")
    conf = model_config(cfg.model, vocab_size)
    if cfg.multilevel.enabled:
        level_configs(conf, cfg.multilevel)  # a shape error, not a short schedule
    shortest = 1
    while not _plannable(conf, cfg, shortest):
        shortest += 1
    if run_flops(cfg, vocab_size, shortest, dp_world) > flops_budget:
        raise ConfigError(f"flops_budget: {flops_budget:.3e} FLOPs can't pay for the {shortest} steps the "
                          "shortest schedule of this method needs; raise the budget")
    # a schedule's FLOPs scale with its step count (its stages and rungs are fractions of it), so the
    # mean cost per step at any step count predicts the answer to within the rounding of boundaries
    dense = replace(cfg, multilevel=replace(cfg.multilevel, enabled=False), sat=replace(cfg.sat, enabled=False))
    probe = max(shortest, int(flops_budget // run_flops(dense, vocab_size, 1, dp_world)))
    guess = max(shortest, int(flops_budget * probe // run_flops(cfg, vocab_size, probe, dp_world)))

    def fits(steps: int) -> bool:
        return steps <= shortest or run_flops(cfg, vocab_size, steps, dp_world) <= flops_budget

    lo, hi, width = guess, guess, 1  # widen to run_flops(lo) <= budget < run_flops(hi), then bisect
    while fits(hi):
        lo, hi, width = hi, hi + width, 2 * width
    while not fits(lo):
        lo, hi, width = max(shortest, lo - width), lo, 2 * width
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _plannable(conf, cfg: TrainConfig, steps: int) -> bool:
    """Whether the V-cycle gives every stage at least one of ``steps`` steps."""
    try:
        plan(conf, cfg.multilevel, steps)
    except ConfigError:
        return False
    return True


__all__ = ["run_flops", "steps_for_budget", "tokens_per_step"]

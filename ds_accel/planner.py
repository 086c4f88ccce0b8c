"""``ds-accel plan``: per-rank memory and expected compute saving of a parallel layout, without a GPU.

Memory of the busiest rank (the pipeline stage with the largest total), per V-cycle level:

* model states, bytes per parameter held: bf16 mixed precision keeps a 2-byte bf16 parameter, a
  2-byte bf16 gradient and 12 bytes of optimizer state (fp32 master copy + AdamW's m and v); fp32
  training keeps 4 + 4 + 8. ZeRO-1 divides the optimizer state by the data-parallel degree dp,
  ZeRO-2 also the gradients, ZeRO-3 also the parameters. ZeRO-Offload (``offload_optimizer``) moves the
  optimizer state, still divided by dp, and SAT's ``freeze`` snapshot of it to host memory (printed
  apart); the GPU's parameters and gradients are counted as without it (an upper bound).
* a rank holds 1/tp of every projection matrix (q, k, v, o, gate, up, down) and of the embedding and
  LM head (vocab split tp ways), and full copies of the RMSNorm weights; pipeline stage s holds
  its share of the layers (the first L mod pp stages one more), stage 0 the embedding and the last
  stage the final norm and LM head (a tied head is a second copy when pp > 1).
* activations (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Sec. 4), bytes per layer for 16-bit activations without recomputation, with s = sequence,
  b = micro-batch, h = hidden, a = heads:

      s b h (34 + 5 a s / h) = 10 s b h                  layer inputs, norm inputs, dropout masks
                             + 8 s b h + 5 a s^2 b       Q, K, V, attention output; s x s scores
                             + 16 s b h                  MLP intermediate (4h wide) and activation

  divided by tp (all of it, as with sequence parallelism). SDPA (the models' attention) runs
  flash/memory-efficient kernels that recompute the s x s scores in the backward pass, so the
  5 a s^2 b term counts only with --attention eager. fp32 activations count twice. Stage s of a
  1F1B pipeline holds min(pp - s, grad_accum) micro-batches in flight, so stage 0 holds as many
  layers' activations as the whole model without pipelining.
* SAT omits heads and MLP channels at the configured omission rate r: only the per-head terms
  (Q, K, V, attention output, scores) scale with the kept share of heads, ceil((1 - r) H) / H,
  and the MLP intermediate with the kept share of channels; the 10 s b h of layer inputs stays.
  Parameters, gradients and optimizer state stay full size (omitted rows are merely not updated).
* SAT's own memory (``sat_extra``), with M the projection-matrix parameters of the stage's layers on
  this tp rank and k = the kept share of them: the kept weight slices, k M parameters in the model's
  dtype, which autograd keeps for the backward (the slices are copies, the dense step's are the weights
  themselves); under ZeRO 0-1 with gradient accumulation the slices' accumulated gradients, k M more in
  the gradient's dtype; and with ``sat.optimizer_policy: freeze`` the snapshot of the omitted elements
  of this rank's optimizer partition, (1 - k) M / dp elements of the master weight and both moments
  (12 bytes each; fp32 training: the weight itself and both moments), ``adam`` none.
* a level transition gathers one full decoder layer of the larger level in fp32 and writes its
  coalesced result at the smaller level, per rank (an upper bound: the engine gathers one parameter
  at a time).

Compute (``ds_accel.flops.train_flops``, relative to dense training of the full model): the V-cycle
costs sum over stages of steps x FLOPs(level) / (total_steps x FLOPs(level 1)); SAT costs the sum
over steps of FLOPs with ceil((1 - rate(step)) n) kept heads and channels per layer under the LORS
schedule, over total_steps x dense.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import LlamaConfig

from .config import (ConfigError, MultiLevelConfig, SATConfig, TrainConfig, config_path, offloads_optimizer,
                     zero_stage)
from .flops import LayerWidth, head_dim, train_flops
from .models import PRESETS, model_config
from .multilevel.vcycle import level_configs
from .multilevel.vcycle import plan as vcycle_plan
from .sat import LORS
from .sat.selection import num_kept

GIB = 2**30
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}  # parameter, gradient, optimizer state per parameter


@dataclass(frozen=True)
class Layout:
    """How the ranks are arranged: tp x pp x dp = nodes x gpus_per_node."""

    nodes: int
    gpus_per_node: int
    tp: int = 1
    pp: int = 1
    zero: int = 1
    offload: bool = False  # ZeRO-Offload: the optimizer state lives in host memory

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


@dataclass(frozen=True)
class Workload:
    seq_len: int = 4096
    micro_batch: int = 1
    grad_accum: int = 8
    dtype: str = "bf16"  # bf16 (mixed precision) | fp32
    attention: str = "sdpa"  # sdpa (scores recomputed in backward) | eager (s x s scores stored)


@dataclass(frozen=True)
class SATExtra:
    """Bytes SAT adds on the busiest rank (module docstring): kept weight slices, their accumulated
    gradients, the ``freeze`` policy's snapshot of omitted optimizer state."""

    slices: float
    slice_grads: float
    frozen: float

    @property
    def total(self) -> float:
        return self.slices + self.slice_grads + self.frozen


@dataclass(frozen=True)
class LevelMemory:
    """Bytes held by the busiest rank while training one level."""

    level: int
    config: LlamaConfig
    stage: int  # the busiest pipeline stage
    layers: int  # decoder layers on that stage
    params: float
    grads: float
    optimizer: float
    activations: float
    sat_activations: float | None  # at the configured omission rate; None when SAT is off
    sat_extra: SATExtra | None = None  # SAT's own memory at the configured rate; None when SAT is off
    host: float = 0.0  # optimizer state in host memory under ZeRO-Offload (not in ``total``)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Transition:
    large: int
    small: int
    gathered: float  # one full decoder layer of the larger level, fp32
    coalesced: float  # its coalesced result at the smaller level, fp32

    @property
    def total(self) -> float:
        return self.gathered + self.coalesced


@dataclass(frozen=True)
class Plan:
    model: str
    layout: Layout
    workload: Workload
    levels: tuple[LevelMemory, ...]
    transitions: tuple[Transition, ...]
    total_steps: int
    multilevel: MultiLevelConfig | None  # None: V-cycle off
    sat: SATConfig | None  # None: SAT off
    vcycle_flops: float | None  # V-cycle FLOPs / dense FLOPs
    lors_flops: float | None  # SAT under LORS FLOPs / dense FLOPs


def layer_params(conf: LlamaConfig, tp: int = 1) -> int:
    """One decoder layer on one tensor-parallel rank: projections split tp ways, two norms replicated."""
    h, m = conf.hidden_size, conf.intermediate_size
    matrices = h * head_dim(conf) * 2 * (conf.num_attention_heads + conf.num_key_value_heads) + 3 * h * m
    return matrices // tp + 2 * h


def stage_layers(layers: int, pp: int) -> list[int]:
    return [layers // pp + (s < layers % pp) for s in range(pp)]


def stage_params(conf: LlamaConfig, tp: int, pp: int) -> list[int]:
    """Parameters held by each pipeline stage's ranks (before ZeRO sharding)."""
    h = conf.hidden_size
    vocab = math.ceil(conf.vocab_size / tp) * h
    counts = []
    for s, layers in enumerate(stage_layers(conf.num_hidden_layers, pp)):
        n = layers * layer_params(conf, tp) + (vocab if s == 0 else 0)
        if s == pp - 1:
            n += h + (0 if conf.tie_word_embeddings and pp == 1 else vocab)
        counts.append(n)
    return counts


def kept_width(conf: LlamaConfig, rate: float, sat: SATConfig) -> LayerWidth:
    """Heads and channels one layer computes at omission rate ``rate``: ceil((1 - r) n) of each unit.

    Granularity kv_group keeps whole GQA groups; granularity head counts ceil((1 - r) K) KV heads
    too, the fewest the kept query heads can need (exact without GQA).
    """
    H, K, m = conf.num_attention_heads, conf.num_key_value_heads, conf.intermediate_size
    q, kv = H, K
    if sat.heads and sat.granularity == "kv_group":
        kv = num_kept(K, rate)
        q = kv * (H // K)
    elif sat.heads:
        q, kv = num_kept(H, rate), num_kept(K, rate)
    return LayerWidth(q, kv, num_kept(m, rate) if sat.channels else m)


def projection_params(conf: LlamaConfig, width: LayerWidth, tp: int = 1) -> int:
    """Parameters of one layer's q/k/v/o and gate/up/down on one tp rank at the given kept widths."""
    h, hd = conf.hidden_size, head_dim(conf)
    return (h * hd * (2 * width.q_heads + 2 * width.kv_heads) + 3 * h * width.channels) // tp


def sat_extra(conf: LlamaConfig, layers: int, layout: Layout, work: Workload, sat: SATConfig) -> SATExtra:
    """SAT's own bytes on a rank holding ``layers`` decoder layers (module docstring)."""
    p_bytes, g_bytes, _ = STATE_BYTES[work.dtype]
    full = projection_params(conf, LayerWidth(conf.num_attention_heads, conf.num_key_value_heads,
                                              conf.intermediate_size), layout.tp)
    kept = projection_params(conf, kept_width(conf, sat.omission_rate, sat), layout.tp)
    deferred = layout.zero <= 1 and work.grad_accum > 1
    omitted_local = (full - kept) / (layout.dp if layout.zero >= 1 else 1)
    return SATExtra(slices=layers * kept * p_bytes, slice_grads=layers * kept * g_bytes if deferred else 0.0,
                    frozen=layers * omitted_local * 12 if sat.optimizer_policy == "freeze" else 0.0)


def layer_activations(conf: LlamaConfig, work: Workload, tp: int, width: LayerWidth | None = None) -> float:
    """Activation bytes one micro-batch leaves in one decoder layer on one tp rank (module docstring)."""
    s, b, h, a = work.seq_len, work.micro_batch, conf.hidden_size, conf.num_attention_heads
    heads_kept = 1.0 if width is None else width.q_heads / a
    channels_kept = 1.0 if width is None else width.channels / conf.intermediate_size
    per_head = 8 * s * b * h + (5 * a * s * s * b if work.attention == "eager" else 0)
    total = 10 * s * b * h + heads_kept * per_head + channels_kept * 16 * s * b * h
    return total / tp * (2 if work.dtype == "fp32" else 1)


def level_memory(level: int, conf: LlamaConfig, layout: Layout, work: Workload,
                 sat: SATConfig | None = None) -> LevelMemory:
    """Memory of the busiest stage of ``conf`` under ``layout``: ZeRO shards model states over dp."""
    p_bytes, g_bytes, o_bytes = STATE_BYTES[work.dtype]
    dp, zero, pp = layout.dp, layout.zero, layout.pp
    sat_width = kept_width(conf, sat.omission_rate, sat) if sat is not None else None
    stages = []
    for s, (n_params, layers) in enumerate(zip(stage_params(conf, layout.tp, pp),
                                               stage_layers(conf.num_hidden_layers, pp))):
        in_flight = layers * min(pp - s, work.grad_accum)
        optimizer = n_params * o_bytes / (dp if zero >= 1 else 1)
        stages.append(LevelMemory(
            level, conf, s, layers,
            params=n_params * p_bytes / (dp if zero >= 3 else 1),
            grads=n_params * g_bytes / (dp if zero >= 2 else 1),
            optimizer=0.0 if layout.offload else optimizer,
            host=optimizer if layout.offload else 0.0,
            activations=in_flight * layer_activations(conf, work, layout.tp),
            sat_activations=None if sat_width is None else in_flight * layer_activations(conf, work, layout.tp, sat_width),
            sat_extra=None if sat is None else sat_extra(conf, layers, layout, work, sat),
        ))
    return max(stages, key=lambda m: m.total)


def transition(level: int, large: LlamaConfig, small: LlamaConfig) -> Transition:
    return Transition(level, level + 1, 4.0 * layer_params(large), 4.0 * layer_params(small))


def vcycle_flops_ratio(conf: LlamaConfig, ml: MultiLevelConfig, total_steps: int, seq_len: int) -> float:
    """FLOPs of the configured V-cycle over those of dense training for the same steps and tokens."""
    stages = vcycle_plan(conf, ml, total_steps)
    spent = sum(st.steps * train_flops(st.config, 1, seq_len) for st in stages)
    return spent / (total_steps * train_flops(conf, 1, seq_len))


def lors_flops_ratio(conf: LlamaConfig, sat: SATConfig, total_steps: int, seq_len: int) -> float:
    """FLOPs of SAT under its schedule over those of dense training; kept widths per step from LORS."""
    try:
        lors = LORS(total_steps, sat.omission_rate, sat.stage1_fraction, sat.rungs, sat.schedule)
    except ValueError as err:
        raise ConfigError(f"sat: {err}; change sat.rungs/sat.stage1_fraction or run.total_steps") from None
    cost: dict[LayerWidth, float] = {}
    spent = 0.0
    for step in range(total_steps):
        w = kept_width(conf, lors.rate(step), sat)
        if w not in cost:
            cost[w] = train_flops(conf, 1, seq_len, [w] * conf.num_hidden_layers)
        spent += cost[w]
    return spent / (total_steps * train_flops(conf, 1, seq_len))


def _common_divisors(values: Sequence[int]) -> list[int]:
    g = math.gcd(*values)
    return [d for d in range(1, g + 1) if g % d == 0]


def validate_layout(layout: Layout, levels: Sequence[LlamaConfig]) -> None:
    """One clear error per layout mistake, naming the flag and a value that works."""
    for flag, value in (("--nodes", layout.nodes), ("--gpus-per-node", layout.gpus_per_node),
                        ("--tp", layout.tp), ("--pp", layout.pp)):
        if value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if layout.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero: must be 0, 1, 2 or 3, got {layout.zero}")
    if layout.world % (layout.tp * layout.pp):
        raise ConfigError(f"--tp/--pp: tp x pp = {layout.tp * layout.pp} must divide the {layout.world} ranks "
                          f"(--nodes x --gpus-per-node); choose tp and pp whose product divides {layout.world}")
    if layout.offload and layout.zero == 0:
        raise ConfigError("--offload: ZeRO-Offload partitions the optimizer state, which ZeRO-0 does not; "
                          "use --zero 1, 2 or 3 with --offload")
    if layout.zero >= 2 and layout.pp > 1:
        raise ConfigError(f"--zero: DeepSpeed's pipeline engine refuses ZeRO stage {layout.zero}; use --zero 1 "
                          "(or 0) with --pp > 1, or --pp 1")
    units = [n for c in levels for n in (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)]
    for i, conf in enumerate(levels, 1):
        for what, n in (("attention heads", conf.num_attention_heads), ("KV heads", conf.num_key_value_heads),
                        ("MLP channels", conf.intermediate_size)):
            if n % layout.tp:
                raise ConfigError(f"--tp: {layout.tp} does not divide the {n} {what} of level {i}; use a tp that "
                                  f"divides every level's heads, KV heads and MLP channels: "
                                  f"{', '.join(map(str, _common_divisors(units)))}")
        if layout.pp > conf.num_hidden_layers:
            fewest = min(c.num_hidden_layers for c in levels)
            raise ConfigError(f"--pp: {layout.pp} stages but level {i} has {conf.num_hidden_layers} layers; "
                              f"use --pp <= {fewest}")


def make_plan(model: str, cfg: TrainConfig, conf: LlamaConfig, layout: Layout, work: Workload) -> Plan:
    """Everything the table prints, from the model shape, the run config's multilevel/sat sections and the layout."""
    ml = cfg.multilevel if cfg.multilevel.enabled else None
    sat = cfg.sat if cfg.sat.enabled else None
    configs = level_configs(conf, ml) if ml is not None else [conf]
    validate_layout(layout, configs)
    steps = cfg.run.total_steps
    return Plan(
        model, layout, work,
        levels=tuple(level_memory(i, c, layout, work, sat) for i, c in enumerate(configs, 1)),
        transitions=tuple(transition(i, a, b) for i, (a, b) in enumerate(zip(configs, configs[1:]), 1)),
        total_steps=steps, multilevel=ml, sat=sat,
        vcycle_flops=vcycle_flops_ratio(conf, ml, steps, work.seq_len) if ml is not None else None,
        lors_flops=lors_flops_ratio(conf, sat, steps, work.seq_len) if sat is not None else None,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    lay, work = plan.layout, plan.workload
    rate = f"SAT r={plan.sat.omission_rate:g}" if plan.sat is not None else "SAT off"
    lines = [
        f"{plan.model} on {lay.nodes} node(s) x {lay.gpus_per_node} GPUs = {lay.world} ranks: "
        f"tp {lay.tp} x pp {lay.pp} x dp {lay.dp}, ZeRO-{lay.zero}{' + optimizer offload' if lay.offload else ''}, "
        f"{work.dtype}"
        f"{' mixed precision' if work.dtype == 'bf16' else ''}",
        f"seq {work.seq_len} x micro-batch {work.micro_batch}, grad accum {work.grad_accum}, {work.attention} attention",
        "",
        "per-rank memory of the busiest pipeline stage (GiB)",
        f"{'level':<9}{'h/heads/kv/mlp/layers':<26}{'stage':>6}{'layers':>7}{'params':>9}{'grads':>8}"
        f"{'optim':>8}{'activ':>8}{rate:>12}{'total':>9}",
    ]
    for m in plan.levels:
        c = m.config
        shape = f"{c.hidden_size}/{c.num_attention_heads}/{c.num_key_value_heads}/{c.intermediate_size}/{c.num_hidden_layers}"
        sat = _gib(m.sat_activations) if m.sat_activations is not None else "-"
        lines.append(f"{'level ' + str(m.level):<9}{shape:<26}{m.stage:>6}{m.layers:>7}{_gib(m.params):>9}"
                     f"{_gib(m.grads):>8}{_gib(m.optimizer):>8}{_gib(m.activations):>8}{sat:>12}{_gib(m.total):>9}")
    if plan.sat is not None:
        lines += ["", f"SAT's own memory per rank (GiB; optimizer_policy {plan.sat.optimizer_policy}): kept weight "
                      "slices + their accumulated gradients + frozen-state snapshot"]
        lines += [f"  level {m.level}: {_gib(m.sat_extra.slices)} + {_gib(m.sat_extra.slice_grads)} + "
                  f"{_gib(m.sat_extra.frozen)} = {_gib(m.sat_extra.total)}" for m in plan.levels]
        if lay.offload:
            lines.append("  (the frozen-state snapshot is taken in host memory, where the offloaded state lives)")
    if lay.offload:
        lines += ["", "host memory per rank, ZeRO-Offload's optimizer state (GiB): "
                  + ", ".join(f"level {m.level} {_gib(m.host)}" for m in plan.levels)]
    lines.append("")
    if plan.multilevel is None:
        lines.append("V-cycle: off (multilevel.enabled is false)")
    else:
        lines.append("level transitions, extra per rank (one full fp32 decoder layer + its coalesced result):")
        lines += [f"  level {t.large} -> {t.small}: {_gib(t.gathered)} + {_gib(t.coalesced)} = {_gib(t.total)} GiB"
                  for t in plan.transitions]
        ml = plan.multilevel
        lines.append(f"V-cycle compute ({ml.levels} levels, width/{ml.width_factor}, depth/{ml.depth_factor}, "
                     f"step fractions {ml.step_fractions}): {plan.vcycle_flops:.3f} of dense, "
                     f"saving {1 - plan.vcycle_flops:.1%}")
    if plan.sat is None:
        lines.append("SAT: off (sat.enabled is false)")
    else:
        s = plan.sat
        lines.append(f"SAT compute ({s.schedule}, r={s.omission_rate:g}, stage 1 {s.stage1_fraction:g}, {s.rungs} rungs): "
                     f"{plan.lors_flops:.3f} of dense, saving {1 - plan.lors_flops:.1%}")
    lines.append(f"(compute over run.total_steps={plan.total_steps}, relative to dense training of level 1)")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import load

    if args.config is None and args.model is None:
        raise ConfigError(f"--model: required without --config; one of {', '.join(PRESETS)}")
    cfg = load(config_path(args.config)) if args.config is not None else TrainConfig()
    if args.model is not None:
        if args.model not in PRESETS:
            raise ConfigError(f"--model: {args.model!r} is not one of {', '.join(PRESETS)}")
        cfg.model = replace(cfg.model, preset=args.model, pretrained=None)
    defaults = Workload() if args.config is None else Workload(
        cfg.data.seq_len, cfg.optim.micro_batch_size, cfg.optim.grad_accum,
        "fp32" if cfg.model.dtype == "fp32" else "bf16")
    work = Workload(*(default if given is None else given for given, default in (
        (args.seq_len, defaults.seq_len), (args.micro_batch, defaults.micro_batch),
        (args.grad_accum, defaults.grad_accum), (args.dtype, defaults.dtype))), attention=args.attention)
    for flag, value in (("--seq-len", work.seq_len), ("--micro-batch", work.micro_batch),
                        ("--grad-accum", work.grad_accum)):
        if value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    ds = json.loads(Path(cfg.deepspeed.config).read_text()) if args.config else {"zero_optimization": {"stage": 1}}
    zero, offload = zero_stage(ds), offloads_optimizer(ds)
    zero = args.zero if args.zero is not None else zero
    layout = Layout(args.nodes, args.gpus_per_node, args.tp, args.pp, zero, args.offload or offload)
    conf = model_config(cfg.model, cfg.data.vocab_size)
    print(format_plan(make_plan(cfg.model.pretrained or cfg.model.preset, cfg, conf, layout, work)))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="per-rank memory and V-cycle/SAT compute saving of a parallel layout (no GPU needed)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"preset ({', '.join(PRESETS)}); default: the config's model")
    p.add_argument("--config", default=None,
                   help="run config whose model, data, optim, multilevel and sat sections to plan "
                        "(default: none, i.e. dense training)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                   help="ZeRO stage (default: the config's DeepSpeed JSON, else 1)")
    p.add_argument("--offload", action="store_true",
                   help="ZeRO-Offload: optimizer state in host memory (default: as the config's DeepSpeed JSON)")
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len of the config, else 4096")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per-rank micro-batch (default: optim.micro_batch_size of the config, else 1)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step (default: optim.grad_accum of the config, else 8)")
    p.add_argument("--dtype", default=None, choices=tuple(STATE_BYTES),
                   help="default: bf16 unless the config says fp32")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"),
                   help="sdpa (the models' setting) keeps no s x s scores; eager does")
    p.set_defaults(func=cmd_plan)

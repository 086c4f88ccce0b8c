"""SAT training-step micro-benchmark: dense vs sliced steps at several omission rates, per optimizer policy.

A step is forward + backward + AdamW (the trainer's: fused, norms not decayed), on the device the run
has (CPU here, keeping freed memory as a training process does; CUDA with a synchronize before every
clock read), in interleaved rounds: dense and every (policy, rate) take turns, and a speedup is the
median over rounds of dense's time over SAT's in the same round, so drift in machine load hits both
sides of each ratio alike. Each SAT step does what the trainer does per step: resolve the selection
(``ResolveCache``: again only when it changed, and each (policy, rate) keeps its own, as its own run
would), one ``omit`` context (weight slices gathered once) that records the kept units' importance in
the same forward, the importance update, the optimizer step with the policy's guard (``freeze``, its
omitted slices and their plans kept with the resolution) or none (``adam``). The selection itself stays
fixed (random kept units), so that each rate's FLOPs are known; choosing it is host work the ZeRO-1
bookkeeping share measures. Runs before commit fddc317 (2026-11-28) did not record importance in the SAT
step: theirs is the sliced step alone (``sat_records_importance`` marks the runs since). Beside each
measured speedup stands the FLOPs limit of the very selection used (dense FLOPs over the FLOPs the kept
heads and channels compute).

Shapes: the ``small`` preset as a whole model (its LM head dilutes the saving), and one Llama-2-7B
decoder layer (the paper's setting without that dilution) at 1,024, 2,048 and (on a GPU) 4,096 tokens
per sequence, where the GEMMs dominate a step as they do on a GPU. In bf16 the parameters themselves are
bf16 (no fp32 master copy): the GEMMs are what SAT changes, and the optimizer's share is then a lower
bound of a mixed-precision run's.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from . import runtime
from .config import OptimConfig, SATConfig
from .engine.build import adamw
from .flops import LayerWidth, train_flops
from .models import llama_config
from .sat import ImportanceTracker, omit, select
from .sat.omit import ResolveCache
from .sat.optim_guard import OmittedStateGuard, omitted_slices, whole_parameter_fragments

POLICIES = ("freeze", "adam")
RATES = (0.25, 0.5, 0.75)


@dataclass
class Shape:
    name: str
    config: LlamaConfig
    batch: int
    seq_len: int
    whole_model: bool  # False: one decoder layer, no embedding or LM head


def catalogue() -> dict[str, Shape]:
    small = llama_config("small", 2000)
    layer7b = llama_config("llama2-7b", 32000)
    layer7b.num_hidden_layers, layer7b.vocab_size = 1, 0
    shapes = [Shape("small", small, 8, 128, True)]
    shapes += [Shape(f"llama2-7b-layer-{n}", layer7b, 1, n, False) for n in (1024, 2048, 4096)]
    return {s.name: s for s in shapes}


def default_shapes(device: torch.device, quick: bool) -> list[str]:
    if quick:
        return ["small"]
    layers = [2048, 4096] if device.type == "cuda" else [1024, 2048]
    return ["small"] + [f"llama2-7b-layer-{n}" for n in layers]


class _LayerModel(torch.nn.Module):
    """One decoder layer with its RoPE, as a loss-producing module."""

    def __init__(self, conf: LlamaConfig):
        super().__init__()
        self.layers = torch.nn.ModuleList([LlamaDecoderLayer(conf, 0)])
        self.rotary = LlamaRotaryEmbedding(conf)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        out = self.layers[0](hidden, position_embeddings=self.rotary(hidden, positions), attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        return out.float().pow(2).mean()


def _build(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conf = copy.deepcopy(shape.config)
    conf._attn_implementation = "sdpa"
    if shape.whole_model:
        model = LlamaForCausalLM(conf)
        data = torch.randint(0, conf.vocab_size, (shape.batch, shape.seq_len))
    else:
        model = _LayerModel(conf)
        data = torch.randn(shape.batch, shape.seq_len, conf.hidden_size).to(dtype)
    return model.to(device=device, dtype=dtype), data.to(device)


def kept_width_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A dense model with half the query / KV heads and MLP channels of ``model`` (SDPA, seed 0): what SAT's
    step at r = 0.5 would cost if slicing were free (docs/benchmark/step/small_probe/)."""
    conf = copy.deepcopy(model.config)
    conf.num_attention_heads //= 2
    conf.num_key_value_heads //= 2
    conf.intermediate_size //= 2
    torch.manual_seed(0)
    narrow = LlamaForCausalLM(conf)
    narrow.config._attn_implementation = "sdpa"
    return narrow


def _selection(model: torch.nn.Module, rate: float, granularity: str):
    """Random kept units (fixed, so that the FLOPs are known; the SAT step still records importance)."""
    if rate == 0:
        return {}, {}
    tracker = ImportanceTracker.for_model(model, metric="random", seed=1, device="cpu")
    return select(tracker, rate, granularity)


def _widths(model, conf: LlamaConfig, keep_heads, keep_channels) -> list[LayerWidth]:
    layers = model.model.layers if hasattr(model, "model") else model.layers
    groups = conf.num_attention_heads // conf.num_key_value_heads
    widths = []
    for i in range(len(layers)):
        q, kv, m = conf.num_attention_heads, conf.num_key_value_heads, conf.intermediate_size
        if i in keep_heads:
            q, kv = len(keep_heads[i]), len(torch.unique(keep_heads[i] // groups))
        if i in keep_channels:
            m = len(keep_channels[i])
        widths.append(LayerWidth(q, kv, m))
    return widths


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape(shape: Shape, rates: list[float], reps: int, device: torch.device, dtype: torch.dtype,
                policies: tuple[str, ...] = POLICIES, granularity: str = "kv_group") -> dict[str, dict]:
    """{policy: {rate: {dense_ms, sat_ms, measured_speedup, speedup_range, flops_limit_speedup, *_rounds}}} for
    one shape. The speedup is the median over rounds of dense's time over SAT's in the same round (with its
    range): the drift of a shared machine moves both steps of a round alike, and medians of the two taken
    apart would mix rounds that ran at different speeds."""
    model, data = _build(shape, device, dtype)
    optimizer = adamw(model, OptimConfig(lr=1e-4))  # the trainer's AdamW (fused), its groups and defaults
    guard = OmittedStateGuard(optimizer)
    selections = {r: _selection(model, r, granularity) for r in [0.0, *rates]}
    resolved = {(r, p): ResolveCache() for r in [0.0, *rates] for p in ("dense", *policies)}  # one per "run"
    trackers = {(r, p): ImportanceTracker.for_model(model) for r in rates for p in policies}  # a dense run has none
    omitted: dict[float, tuple] = {}  # freeze: per rate, (resolution, its omitted slices, their fragment plans)

    def step(rate: float, policy: str) -> float:
        _synchronize(device)
        start = time.perf_counter()
        keep_heads, keep_channels = selections[rate]
        selection = resolved[rate, policy](model, keep_heads, keep_channels)
        tracker = trackers.get((rate, policy))
        with omit(model, keep_heads, keep_channels, tracker, selection=selection):
            loss = model(input_ids=data, labels=data, use_cache=False).loss if shape.whole_model else model(data)
            loss.backward()
        if tracker is not None:
            tracker.update()
        if policy == "freeze" and rate > 0:
            if omitted.get(rate, (None,))[0] is not selection:  # kept with the resolution, as the trainer does
                omitted[rate] = (selection, omitted_slices(model, keep_heads, keep_channels, selection=selection), {})
            _, slices, plans = omitted[rate]
            guard.arm(lambda: whole_parameter_fragments(optimizer, slices, plans))
        optimizer.step()
        guard.disarm()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        return time.perf_counter() - start

    kinds = [(0.0, "dense")] + [(r, p) for p in policies for r in rates]
    times: dict[tuple[float, str], list[float]] = {k: [] for k in kinds}
    for k in kinds:  # warm-up: allocator, optimizer state
        step(*k)
    for _ in range(reps):
        for k in kinds:
            times[k].append(step(*k))
    guard.remove()
    dense_times = times[(0.0, "dense")]
    conf, tokens = shape.config, shape.batch * shape.seq_len
    dense_flops = train_flops(conf, tokens, shape.seq_len)
    result: dict[str, dict] = {}
    for policy in policies:
        result[policy] = {}
        for r in rates:
            sat_times = times[(r, policy)]
            ratios = [d / s for d, s in zip(dense_times, sat_times)]
            sat_flops = train_flops(conf, tokens, shape.seq_len, _widths(model, conf, *selections[r]))
            result[policy][str(r)] = {
                "dense_ms": statistics.median(dense_times) * 1e3, "sat_ms": statistics.median(sat_times) * 1e3,
                "measured_speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
                "flops_limit_speedup": dense_flops / sat_flops,
                "dense_ms_rounds": [t * 1e3 for t in dense_times], "sat_ms_rounds": [t * 1e3 for t in sat_times]}
    return result


def run(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, shapes: list[str] | None = None,
        quick: bool = False, rates: tuple[float, ...] = RATES, policy: str | None = None) -> dict:
    """Every shape x policy as ``shapes[f"{shape} {policy}"]``; the top-level ``rates`` are the small preset's
    under ``policy`` (the run's default)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        runtime.keep_freed_memory()  # as a training process on CPU has it (runtime.setup_process)
    known = catalogue()
    names = shapes or default_shapes(device, quick)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"step_bench: unknown shape {unknown[0]!r}; known: {', '.join(known)}")
    per_shape: dict[str, dict] = {}
    for name in names:
        shape = known[name]
        reps = (5 if quick else 15) if shape.whole_model else 5
        for pol, by_rate in bench_shape(shape, list(rates), reps, device, dtype).items():
            per_shape[f"{name} {pol}"] = {"seq_len": shape.seq_len, "tokens": shape.batch * shape.seq_len,
                                          "policy": pol, "rates": by_rate}
    policy = policy or SATConfig().optimizer_policy  # the headline: the run's default policy
    headline = per_shape.get(f"small {policy}") or next(iter(per_shape.values()))
    return {"rates": {r: {k: v[k] for k in ("measured_speedup", "flops_limit_speedup")}
                      for r, v in headline["rates"].items()},
            "shapes": per_shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "cpu": runtime.cpu_description(),
            "sat_records_importance": True}


def table(result: dict) -> str:
    lines = ["| shape | tokens | policy | omission rate | dense step (ms) | SAT step (ms) | measured speedup "
             "| range over rounds | FLOPs-limit speedup | share of limit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["shapes"].items():
        for r, v in entry["rates"].items():
            low, high = v["speedup_range"]
            lines.append(f"| {name.rsplit(' ', 1)[0]} | {entry.get('tokens', '')} | {entry['policy']} | {r} "
                         f"| {v['dense_ms']:.1f} | {v['sat_ms']:.1f} | {v['measured_speedup']:.2f}x "
                         f"| {low:.2f}-{high:.2f}x "
                         f"| {v['flops_limit_speedup']:.2f}x | {v['measured_speedup'] / v['flops_limit_speedup']:.0%} |")
    return "\n".join(lines)


def zero1_bookkeeping(out: Path, policy: str, steps: int = 30) -> dict:
    """SAT's bookkeeping share of a training step under ZeRO-1 on 2 ranks: ``ds-accel train`` (small
    preset, SAT, ``policy``) through the ``deepspeed`` launcher; the controller's host time for choosing
    and resolving units, updating importance and the optimizer guard, over the run's training time
    (rank 0's figures)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    from .config import REPO_ROOT

    run_dir = out / f"zero1_{policy}"
    shutil.rmtree(run_dir, ignore_errors=True)  # DeepSpeed's monitor appends to an earlier run's files
    run_dir.mkdir(parents=True)
    cfg = {"run": {"output_dir": str(run_dir), "total_steps": steps, "eval_every": steps, "log_every": 5,
                   "export": False, "progress": False},
           "data": {"seq_len": 128}, "model": {"preset": "small", "dtype": "fp32"},
           "optim": {"micro_batch_size": 8}, "sat": {"enabled": True, "optimizer_policy": policy,
                                                      "stage1_fraction": 1.0},
           "deepspeed": {"config": str(REPO_ROOT / "ds_configs" / "zero1.json")}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                    str(REPO_ROOT / "launch" / "train.py"), "--config", str(run_dir / "config.yaml")],
                   check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the figures are kept, not the weights
    result = json.loads((run_dir / "result.json").read_text())
    return {"policy": policy, "steps": steps, "wall_s": result["wall_s"],
            "bookkeeping_s": result["sat_bookkeeping_s"], "share": result["sat_bookkeeping_s"] / result["wall_s"]}


def step_only(out: Path, quick: bool = False) -> dict:
    """``ds-accel bench --step-only``: the step benchmark on this machine's device and the ZeRO-1
    bookkeeping share, written to ``out/sat_step.json`` and ``out/sat_step.md``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    result = run(quick=quick)
    if not quick and result["device"] == "cpu":
        result["zero1_bookkeeping"] = [zero1_bookkeeping(out / "zero1", p) for p in POLICIES]
    (out / "sat_step.json").write_text(json.dumps(result, indent=1))
    lines = [f"SAT training step against dense on {result['device']} ({result['dtype']}, "
             f"{result['threads']} threads; CPU: {result['cpu']}): forward + backward + AdamW, SAT's step "
             "recording importance as the trainer's does; speedup: median "
             "over interleaved rounds of dense's time over SAT's in the same round.", "",
             table(result)]
    for b in result.get("zero1_bookkeeping", []):
        lines += ["", f"ZeRO-1, 2 ranks, small preset, SAT rate 0.5, `{b['policy']}`: bookkeeping "
                      f"{b['bookkeeping_s']:.2f} s of {b['wall_s']:.1f} s training ({b['share']:.1%})."]
    (out / "sat_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result

"""SAT training-step micro-benchmark: dense vs sliced steps at several omission rates.

A step is forward + backward + AdamW (with the omitted-rows guard for SAT), timed as the median of
interleaved repetitions (dense and each rate take turns, so drift in machine load hits all alike).
Beside each measured speedup stands the FLOPs limit of the very selection used: dense FLOPs over
the FLOPs the kept heads and channels compute (the spec's total / (total - r * layer FLOPs), with
ceil rounding of the kept counts). Two shapes: a whole small model, where the LM head dilutes the
saving, and one Llama-2-7B decoder layer, the paper's setting without that dilution.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from .flops import LayerWidth, train_flops
from .models import llama_config
from .sat import ImportanceTracker, guard_omitted, omit, omitted_slices, select
from .sat.omit import HeadSelection


@dataclass
class Shape:
    name: str
    config: LlamaConfig
    batch: int
    seq_len: int
    whole_model: bool  # False: one decoder layer, no embedding or LM head


def shapes(quick: bool) -> list[Shape]:
    small = llama_config("small", 2000)
    layer7b = llama_config("llama2-7b", 32000)
    layer7b.num_hidden_layers, layer7b.vocab_size = 1, 0
    result = [Shape("small preset (whole model)", small, 8, 128, True)]
    if not quick:
        result.append(Shape("Llama-2-7B decoder layer", layer7b, 2, 128, False))
    return result


class _LayerModel(torch.nn.Module):
    """One decoder layer with its RoPE, as a loss-producing module."""

    def __init__(self, conf: LlamaConfig):
        super().__init__()
        self.layers = torch.nn.ModuleList([LlamaDecoderLayer(conf, 0)])
        self.rotary = LlamaRotaryEmbedding(conf)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        out = self.layers[0](hidden, position_embeddings=self.rotary(hidden, positions), attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        return out.float().pow(2).mean()


def _build(shape: Shape) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conf = copy.deepcopy(shape.config)
    conf._attn_implementation = "sdpa"
    if shape.whole_model:
        model = LlamaForCausalLM(conf)
        data = torch.randint(0, conf.vocab_size, (shape.batch, shape.seq_len))
    else:
        model = _LayerModel(conf)
        data = torch.randn(shape.batch, shape.seq_len, conf.hidden_size)
    return model, data


def _selection(model: torch.nn.Module, rate: float, granularity: str):
    """Random kept units (the benchmark times the computation, not the scoring)."""
    if rate == 0:
        return {}, {}
    tracker = ImportanceTracker.for_model(model, metric="random", seed=1)
    return select(tracker, rate, granularity)


def _widths(model, conf: LlamaConfig, keep_heads, keep_channels) -> list[LayerWidth]:
    layers = model.model.layers if hasattr(model, "model") else model.layers
    widths = []
    for i, layer in enumerate(layers):
        q, kv, m = conf.num_attention_heads, conf.num_key_value_heads, conf.intermediate_size
        if i in keep_heads:
            sel = HeadSelection.of(layer.self_attn, keep_heads[i])
            q, kv = len(sel.q_heads), len(sel.kv_heads)
        if i in keep_channels:
            m = len(keep_channels[i])
        widths.append(LayerWidth(q, kv, m))
    return widths


def bench_shape(shape: Shape, rates: list[float], reps: int, granularity: str = "kv_group") -> dict[str, dict]:
    """{rate: {dense_ms, sat_ms, measured_speedup, flops_limit_speedup}} for one shape."""
    model, data = _build(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    selections = {r: _selection(model, r, granularity) for r in [0.0, *rates]}

    def step(rate: float) -> float:
        keep_heads, keep_channels = selections[rate]
        start = time.perf_counter()
        with omit(model, keep_heads, keep_channels):
            if shape.whole_model:
                loss = model(input_ids=data, labels=data, use_cache=False).loss
            else:
                loss = model(data)
            loss.backward()
        with guard_omitted(optimizer, omitted_slices(model, keep_heads, keep_channels)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[float, list[float]] = {r: [] for r in selections}
    for r in selections:  # warm-up: allocator, optimizer state
        step(r)
    for _ in range(reps):
        for r in selections:
            times[r].append(step(r))
    dense = statistics.median(times[0.0])
    conf, tokens = shape.config, shape.batch * shape.seq_len
    dense_flops = train_flops(conf, tokens, shape.seq_len)
    result = {}
    for r in rates:
        sat = statistics.median(times[r])
        sat_flops = train_flops(conf, tokens, shape.seq_len, _widths(model, conf, *selections[r]))
        result[str(r)] = {"dense_ms": dense * 1e3, "sat_ms": sat * 1e3, "measured_speedup": dense / sat,
                          "flops_limit_speedup": dense_flops / sat_flops}
    return result


def run(quick: bool = False, rates: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict:
    """All shapes; the first (the small preset) is the headline ``rates`` entry of sat_step.json."""
    per_shape = {}
    for shape in shapes(quick):
        reps = 3 if not shape.whole_model else (5 if quick else 9)
        per_shape[shape.name] = bench_shape(shape, list(rates), reps)
    first = next(iter(per_shape.values()))
    return {"rates": {r: {k: v[k] for k in ("measured_speedup", "flops_limit_speedup")} for r, v in first.items()},
            "shapes": per_shape, "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    lines = ["| shape | omission rate | dense step (ms) | SAT step (ms) | measured speedup | FLOPs-limit speedup "
             "| share of limit |", "|---|---|---|---|---|---|---|"]
    for name, rates in result["shapes"].items():
        for r, v in rates.items():
            lines.append(f"| {name} | {r} | {v['dense_ms']:.1f} | {v['sat_ms']:.1f} | {v['measured_speedup']:.2f}x "
                         f"| {v['flops_limit_speedup']:.2f}x | {v['measured_speedup'] / v['flops_limit_speedup']:.0%} |")
    return "\n".join(lines)

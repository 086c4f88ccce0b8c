"""The `small` preset's SAT step at r = 0.5 (`adam`, the step benchmark's step) with SAT's attention on
SDPA's own GQA ("gqa") and with the index_select copy it used before ("index"), alternating step by step
in one process on one model: the ratio index / gqa of each adjacent pair, its median and quartiles over
the pairs, so the machine's drift (which moved whole benchmark runs by +-5%) cancels.

    .venv/bin/python docs/benchmark/step/gqa_probe/step_paired.py 60
"""
import statistics
import sys
import time

import torch

import ds_accel.sat.omit  # noqa: F401  (the module; ds_accel.sat.omit as an attribute is the function)
from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw

omit_module = sys.modules["ds_accel.sat.omit"]
runtime.keep_freed_memory()
gqa_policy = omit_module.use_gqa_in_sdpa
shape = step_bench.catalogue()["small"]
model, data = step_bench._build(shape, torch.device("cpu"), torch.float32)
optimizer = adamw(model, OptimConfig(lr=1e-4))
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
selection = omit_module.ResolveCache()(model, keep_heads, keep_channels)


def step(mode: str) -> float:
    omit_module.use_gqa_in_sdpa = gqa_policy if mode == "gqa" else (lambda *args: False)
    start = time.perf_counter()
    with omit_module.omit(model, keep_heads, keep_channels, selection=selection):
        model(input_ids=data, labels=data, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


for mode in ("index", "gqa", "index", "gqa"):  # warm-up
    step(mode)
pairs = []
for i in range(int(sys.argv[1])):
    order = ("index", "gqa") if i % 2 == 0 else ("gqa", "index")
    times = {mode: step(mode) for mode in order}
    pairs.append((times["index"], times["gqa"]))
ratios = sorted(a / b for a, b in pairs)
q1, q2, q3 = statistics.quantiles(ratios, n=4)
print(f"{len(pairs)} pairs; index step median {statistics.median(a for a, _ in pairs) * 1e3:.1f} ms, "
      f"gqa {statistics.median(b for _, b in pairs) * 1e3:.1f} ms")
print(f"index / gqa per pair: median {q2:.4f}, quartiles {q1:.4f}-{q3:.4f}, range {ratios[0]:.4f}-{ratios[-1]:.4f}")

"""How far is SAT's step on the ``small`` preset at r = 0.5 from a model built at the kept width, measured
so that this machine's drift cancels? Three steps take turns (dense, SAT with the step benchmark's selection
and ``adam`` policy, and the dense step of a model with half the query / KV heads and MLP channels, its own
fused AdamW), the order rotating every round; each round gives paired ratios, reported as the median and
quartiles over rounds. The kept-width model is the speed a free slicing would reach, and then some (its
optimizer has half the work).

    .venv/bin/python docs/benchmark/step/small_probe/kept_width_paired.py 150
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
model, data = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
narrow = step_bench.kept_width_model(model)
optimizers = {"full": adamw(model, OptimConfig(lr=1e-4)), "narrow": adamw(narrow, OptimConfig(lr=1e-4))}
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
selection = omit_module.ResolveCache()(model, keep_heads, keep_channels)


def step(kind: str) -> float:
    start = time.perf_counter()
    if kind == "kept-width":
        narrow(input_ids=data, labels=data, use_cache=False).loss.backward()
        opt = optimizers["narrow"]
    else:
        keeps = (keep_heads, keep_channels) if kind == "SAT" else ({}, {})
        with omit_module.omit(model, *keeps, selection=selection if kind == "SAT" else None):
            model(input_ids=data, labels=data, use_cache=False).loss.backward()
        opt = optimizers["full"]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


kinds = ["dense", "SAT", "kept-width"]
for kind in kinds * 2:  # warm-up
    step(kind)
rounds = []
for i in range(int(sys.argv[1])):
    order = kinds[i % 3:] + kinds[:i % 3]
    rounds.append({kind: step(kind) for kind in order})


def summary(name: str, ratios: list[float]) -> str:
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return f"| {name} | {q2:.3f} | {q1:.3f}-{q3:.3f} |"


print(f"small preset, 8 x 128 tokens, {torch.get_num_threads()} threads, torch {torch.__version__}; "
      f"{len(rounds)} rounds; median step: " + ", ".join(
          f"{k} {statistics.median(r[k] for r in rounds) * 1e3:.1f} ms" for k in kinds))
print("| paired ratio per round | median | quartiles |\n|---|---|---|")
print(summary("dense / SAT (SAT's speedup)", [r["dense"] / r["SAT"] for r in rounds]))
print(summary("dense / kept-width (the kept-width model's speedup)", [r["dense"] / r["kept-width"] for r in rounds]))
print(summary("SAT / kept-width (SAT's time over the kept-width model's)", [r["SAT"] / r["kept-width"] for r in rounds]))

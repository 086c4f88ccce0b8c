"""Which way should a sliced weight's gradient go back to the full-size weight on the CPU?

``omit`` slices with a plain ``index_select`` on the CPU (``slice_directly``), whose backward is
``zeros(full).index_add_(dim, kept, grad)``; on a GPU, weights of 4M elements and more take the gather-once
function, whose backward is ``zeros(full).index_copy_(dim, kept, grad)``. The kept indices are unique, so
the two write the same gradient. Two parts:

1. The write-back alone, at a Llama-2-7B layer's MLP weights (11,008 x 4,096 rows and 4,096 x 11,008
   columns) with a quarter of the rows / columns omitted, median of 7.
2. The 7B layer's whole SAT step (the step benchmark's: forward + backward + AdamW, importance recorded),
   1,024 tokens, r = 0.25 and 0.5, ``adam``, each way in alternating rounds, with dense in every round.

First run (scatter_probe.txt, 2026-11-28 06:56 UTC, commit 029b6b8, nothing else running): the whole steps
tie, so the CPU keeps ``index_select``. The write-back alone is not read: an uncommitted scratch run minutes
before ordered the rows' two ways the other way round.

    .venv/bin/python docs/benchmark/step/scatter_probe/scatter_probe.py 6
"""
import importlib
import statistics
import sys
import time

import torch

from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat import ImportanceTracker, omit
from ds_accel.sat.omit import ResolveCache

omit_module = importlib.import_module("ds_accel.sat.omit")
runtime.keep_freed_memory()
torch.set_num_threads(runtime.usable_cores())
print(f"{runtime.cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


def median_ms(fn, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


print("\nThe write-back alone, a quarter omitted (median of 7, ms)")
print("| weight | dim | zeros + index_add_ (index_select's backward) | zeros + index_copy_ (the function's) |")
print("|---|---|---|---|")
generator = torch.Generator().manual_seed(0)
for dim, shape in ((0, (11008, 4096)), (1, (4096, 11008))):
    n = shape[dim]
    kept = torch.randperm(n, generator=generator)[: n * 3 // 4].sort().values
    grad_shape = list(shape)
    grad_shape[dim] = len(kept)
    grad = torch.randn(grad_shape)
    add = median_ms(lambda: torch.zeros(shape).index_add_(dim, kept, grad))
    copy = median_ms(lambda: torch.zeros(shape).index_copy_(dim, kept, grad))
    print(f"| {shape[0]:,} x {shape[1]:,} | {dim} ({'rows' if dim == 0 else 'columns'}) | {add:.1f} | {copy:.1f} |")

shape = step_bench.catalogue()["llama2-7b-layer-1024"]
model, data = step_bench._build(shape, torch.device("cpu"), torch.float32)
optimizer = adamw(model, OptimConfig(lr=1e-4))
rates = (0.25, 0.5)
selections = {r: step_bench._selection(model, r, "kv_group") for r in rates}
kinds = [("dense", 0.0)] + [(way, r) for r in rates for way in ("index_select", "function")]
caches = {kind: ResolveCache() for kind in kinds}
trackers = {kind: ImportanceTracker.for_model(model) for kind in kinds[1:]}
original = omit_module.slice_directly


def step(kind: tuple[str, float]) -> float:
    way, rate = kind
    keeps = selections[rate] if rate else ({}, {})
    tracker = trackers.get(kind)
    omit_module.slice_directly = (lambda *a: False) if way == "function" else original
    start = time.perf_counter()
    with omit(model, *keeps, tracker, selection=caches[kind](model, *keeps)):
        model(data).backward()
    if tracker is not None:
        tracker.update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    omit_module.slice_directly = original
    return elapsed


for kind in kinds:  # warm-up
    step(kind)
rounds = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    order = kinds if i % 2 == 0 else [kinds[0]] + kinds[:0:-1]
    rounds.append({kind: step(kind) for kind in order})
print(f"\nLlama-2-7B layer, 1,024 tokens, adam, kv_group: {len(rounds)} rounds (SAT steps in alternating order)")
print("| rate | slices | SAT step (median s) | dense / SAT: median, range | index_select's step / function's: median, range |")
print("|---|---|---|---|---|")
for rate in rates:
    for way in ("index_select", "function"):
        sat = [r[(way, rate)] for r in rounds]
        speed = [r[("dense", 0.0)] / s for r, s in zip(rounds, sat)]
        pair = [r[("index_select", rate)] / r[("function", rate)] for r in rounds]
        print(f"| {rate} | {way} | {statistics.median(sat):.2f} | {statistics.median(speed):.3f}x, "
              f"{min(speed):.3f}-{max(speed):.3f} | " + (f"{statistics.median(pair):.3f}, {min(pair):.3f}-{max(pair):.3f} |"
                                                       if way == "function" else "|"))
print(f"dense step: median {statistics.median(r[('dense', 0.0)] for r in rounds):.2f} s")

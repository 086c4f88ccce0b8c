"""The step benchmark's `small` preset at r = 0.5 (`adam`), SAT's attention with SDPA's own GQA ("gqa") and
with the index_select copy it used before ("index", forced by making `use_gqa_in_sdpa` say no), alternating
in one process: each run's speedup is the median over 10 interleaved rounds of dense over SAT.

    .venv/bin/python docs/benchmark/step/gqa_probe/step_ab.py 5
"""
import statistics
import sys

import torch

import ds_accel.sat.omit  # noqa: F401  (the module; ds_accel.sat.omit as an attribute is the function)
from ds_accel import runtime, step_bench

omit_module = sys.modules["ds_accel.sat.omit"]
runtime.keep_freed_memory()
gqa_policy = omit_module.use_gqa_in_sdpa
shape = step_bench.catalogue()["small"]
results: dict[str, list[tuple[float, ...]]] = {"index": [], "gqa": []}
for run in range(int(sys.argv[1])):
    for mode in results:
        omit_module.use_gqa_in_sdpa = gqa_policy if mode == "gqa" else (lambda *args: False)
        r = step_bench.bench_shape(shape, [0.5], 10, torch.device("cpu"), torch.float32, policies=("adam",))
        r = r["adam"]["0.5"]
        results[mode].append((r["measured_speedup"], r["measured_speedup"] / r["flops_limit_speedup"],
                              r["dense_ms"], r["sat_ms"]))
        print(f"run {run} {mode:5s} speedup {r['measured_speedup']:.3f}x, share of limit "
              f"{results[mode][-1][1]:.1%}, dense {r['dense_ms']:.1f} ms, SAT {r['sat_ms']:.1f} ms", flush=True)
for mode, runs in results.items():
    speedups = [x[0] for x in runs]
    print(f"{mode}: median {statistics.median(speedups):.3f}x, range {min(speedups):.3f}-{max(speedups):.3f}x")

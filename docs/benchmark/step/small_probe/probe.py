"""How fast could SAT's step on the ``small`` preset be? Its FLOPs limit at r = 0.5 is 1.86x, but its
GEMMs are small (hidden 256). This compares, on the step benchmark's data (8 x 128 tokens), the full
model's dense step, its SAT step at r = 0.5 (``adam`` policy, ``kv_group``, as ``step_bench``) and the
dense step of a model built at the kept width (half the query / KV heads, half the MLP channels; its
own fused AdamW over its own, smaller, parameters): the speed a perfectly free slicing would reach,
and then some (its optimizer has half the work); and SAT's step with the gather-once slices (a Python
autograd function per weight) that omit() uses under gradient accumulation or checkpointing, against
the plain ``index_select`` slices it uses for one micro-batch. Median of 15 interleaved repetitions after a
warm-up; then a torch.profiler table of 5 SAT steps: the slicing's own operators and their share of
the step's operator time; then, 8 profiled steps each, the operators whose time differs most between
the SAT step and the kept-width model's (where SAT's extra time goes).

    .venv/bin/python docs/benchmark/step/small_probe/probe.py > docs/benchmark/step/small_probe/probe.txt  (torch.profiler prints USDT lines there too)
"""
import importlib
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat import omit
from ds_accel.sat.omit import resolve

omit_module = importlib.import_module("ds_accel.sat.omit")  # the module (ds_accel.sat.omit is the function)
runtime.keep_freed_memory()
torch.set_num_threads(runtime.usable_cores())
model, data = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
narrow = step_bench.kept_width_model(model)
optimizers = {"full": adamw(model, OptimConfig(lr=1e-4)), "narrow": adamw(narrow, OptimConfig(lr=1e-4))}
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")


class GatherOnceSlices(omit_module.StepSlices):
    """The slices omit() takes under gradient accumulation or checkpointing (a Python autograd function
    per weight), forced here for one micro-batch to compare with its plain index_select slices."""

    def __init__(self, micro_batches: int = 1, keep: bool = True, direct: bool = False) -> None:
        super().__init__(micro_batches, keep, direct=False)


def step(kind: str) -> float:
    start = time.perf_counter()
    net, opt = (narrow, optimizers["narrow"]) if kind == "kept-width model" else (model, optimizers["full"])
    keeps = (keep_heads, keep_channels) if kind.startswith("SAT r=0.5") else ({}, {})
    omit_module.StepSlices = GatherOnceSlices if kind == "SAT r=0.5, gather-once function" else PlainSlices
    with omit(net, *keeps, selection=resolve(net, *keeps)):
        net(input_ids=data, labels=data, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


PlainSlices = omit_module.StepSlices
kinds = ["dense", "SAT r=0.5", "SAT r=0.5, gather-once function", "kept-width model"]
for k in kinds:
    step(k)
times = {k: [] for k in kinds}
for _ in range(15):
    for k in kinds:
        times[k].append(step(k))
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(f"small preset, 8 x 128 tokens, {torch.get_num_threads()} threads; 15 interleaved rounds: median step time, "
      "and the median (range) over rounds of dense's time over this step's in the same round")
print("| step | ms | speedup over dense | range |\n|---|---|---|---|")
for k in kinds:
    ratios = [d / t for d, t in zip(times["dense"], times[k])]
    print(f"| {k} | {med[k]:.1f} | {statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |")

with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(5):
        step("SAT r=0.5")
self_ms = {e.key: e.self_cpu_time_total / 5e3 for e in prof.key_averages()}
total = sum(self_ms.values())
slicing = ["aten::index_select", "aten::index_add_", "aten::scatter_add_", "aten::new_zeros", "aten::zero_",
           "IndexSelectBackward0", "aten::index_copy_", "_SlicedWeight", "_SlicedWeightBackward"]
print(f"\nSAT r=0.5 under torch.profiler: {total:.1f} ms of operator time per step")
print("| operator | ms per step | share |\n|---|---|---|")
for key in slicing:
    print(f"| {key} | {self_ms.get(key, 0.0):.1f} | {self_ms.get(key, 0.0) / total:.1%} |")
print(f"| aten::fill_ (zero-filling, the full-size gradients' and others) | {self_ms.get('aten::fill_', 0.0):.1f} "
      f"| {self_ms.get('aten::fill_', 0.0) / total:.1%} |")

per_op = {}
for k in ["SAT r=0.5", "kept-width model"]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            step(k)
    per_op[k] = {e.key: e.self_cpu_time_total / 8e3 for e in prof.key_averages()}
sat, narrow_ms = per_op["SAT r=0.5"], per_op["kept-width model"]
print(f"\nSAT r=0.5 against the kept-width model under torch.profiler (8 steps each): {sum(sat.values()):.1f} "
      f"against {sum(narrow_ms.values()):.1f} ms of operator time per step; the 15 largest differences")
print("| operator | SAT ms | kept-width ms | difference |\n|---|---|---|---|")
for key in sorted(set(sat) | set(narrow_ms), key=lambda x: -abs(sat.get(x, 0.0) - narrow_ms.get(x, 0.0)))[:15]:
    a, b = sat.get(key, 0.0), narrow_ms.get(key, 0.0)
    print(f"| {key} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")

"""Plain index_select slices (what omit() takes for one micro-batch without checkpointing) against the
gather-once slices (a Python autograd function per weight, what it takes under gradient accumulation or
checkpointing), on the step benchmark's ``small`` preset at r = 0.5 (``adam`` policy, ``kv_group``):
N rounds, the three steps in alternating order, paired ratios within each round (this machine's speed
drifts by tens of percent between rounds, so only ratios inside a round are compared).

    .venv/bin/python docs/benchmark/step/small_probe/slices_ab.py 60 > docs/benchmark/step/small_probe/slices_ab.txt
"""
import importlib
import statistics
import sys
import time

import torch

from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat import omit
from ds_accel.sat.omit import resolve

omit_module = importlib.import_module("ds_accel.sat.omit")  # the module (ds_accel.sat.omit is the function)
runtime.keep_freed_memory()
torch.set_num_threads(runtime.usable_cores())
model, data = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
optimizer = adamw(model, OptimConfig(lr=1e-4))
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
PlainSlices = omit_module.StepSlices


class GatherOnceSlices(PlainSlices):
    """omit()'s slices under accumulation or checkpointing, forced for one micro-batch."""

    def __init__(self, micro_batches: int = 1, keep: bool = True, direct: bool = False) -> None:
        super().__init__(micro_batches, keep, direct=False)


def step(kind: str) -> float:
    omit_module.StepSlices = GatherOnceSlices if kind == "once" else PlainSlices
    start = time.perf_counter()
    keeps = ({}, {}) if kind == "dense" else (keep_heads, keep_channels)
    with omit(model, *keeps, selection=resolve(model, *keeps)):
        model(input_ids=data, labels=data, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def spread(ratios: list[float]) -> str:
    q = sorted(ratios)
    return f"median {statistics.median(ratios):.3f} IQR {q[len(q) // 4]:.3f}-{q[3 * len(q) // 4]:.3f}"


kinds = ["dense", "once", "direct"]
for kind in kinds:  # warm-up
    step(kind)
    step(kind)
times: dict[str, list[float]] = {kind: [] for kind in kinds}
for i in range(int(sys.argv[1])):
    for kind in kinds if i % 2 == 0 else kinds[::-1]:
        times[kind].append(step(kind))
for kind in kinds:
    ratios = [d / t for d, t in zip(times["dense"], times[kind])]
    print(f"{kind:7s} median {statistics.median(times[kind]) * 1e3:7.1f} ms  paired speedup {spread(ratios)}")
ratios = [o / d for o, d in zip(times["once"], times["direct"])]
print(f"once/direct paired: {spread(ratios)}, direct faster in {sum(r > 1 for r in ratios)}/{len(ratios)} rounds")

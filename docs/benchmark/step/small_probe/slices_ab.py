"""Plain index_select slices (what omit() takes for one micro-batch without checkpointing) against the
gather-once slices (a Python autograd function per weight, what it takes under gradient accumulation or
checkpointing), on the step benchmark's ``small`` preset at r = 0.5 (``adam`` policy, ``kv_group``):
N rounds, the three steps in alternating order, paired ratios within each round (this machine's speed
drifts by tens of percent between rounds, so only ratios inside a round are compared).

    .venv/bin/python docs/benchmark/step/small_probe/slices_ab.py 60 > docs/benchmark/step/small_probe/slices_ab.txt
"""
import importlib, statistics, time, sys
import torch
from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat import omit
from ds_accel.sat.omit import resolve
om = importlib.import_module("ds_accel.sat.omit")
runtime.keep_freed_memory(); torch.set_num_threads(runtime.usable_cores())
model, data = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
opt = adamw(model, OptimConfig(lr=1e-4))
kh, kc = step_bench._selection(model, 0.5, "kv_group")
Plain = om.StepSlices
class Once(Plain):
    def __init__(self, micro_batches=1, keep=True, direct=False): super().__init__(micro_batches, keep, direct=False)
def step(kind):
    om.StepSlices = Once if kind == "once" else Plain
    t = time.perf_counter()
    keeps = ({}, {}) if kind == "dense" else (kh, kc)
    with omit(model, *keeps, selection=resolve(model, *keeps)):
        model(input_ids=data, labels=data, use_cache=False).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t
kinds = ["dense", "once", "direct"]
for k in kinds: step(k); step(k)
T = {k: [] for k in kinds}
n = int(sys.argv[1])
for i in range(n):
    order = kinds if i % 2 == 0 else kinds[::-1]
    for k in order: T[k].append(step(k))
for k in kinds:
    r = [d / s for d, s in zip(T["dense"], T[k])]
    q = sorted(r)
    print(f"{k:7s} median {statistics.median(T[k])*1e3:7.1f} ms  paired speedup median {statistics.median(r):.3f} IQR {q[len(q)//4]:.3f}-{q[3*len(q)//4]:.3f}")
r = [o / d for o, d in zip(T["once"], T["direct"])]
q = sorted(r)
print(f"once/direct paired: median {statistics.median(r):.3f} IQR {q[len(q)//4]:.3f}-{q[3*len(q)//4]:.3f}, direct faster in {sum(x > 1 for x in r)}/{len(r)} rounds")

"""What does recording importance add to SAT's step on the ``small`` preset at r = 0.5, and what did the
channel statistic's reduction cost? Two parts:

1. The MLP channel statistic (mean over tokens of |a_c|) alone, the reduction ``channel_magnitude`` used
   until stop 29 (``vector_norm(ord=1)`` over the leading dims) against the one it uses now (``abs`` then a
   mean over the token rows), interleaved, at the ``small`` preset's kept channels (8 x 128 tokens, 344
   channels) and at a Llama-2-7B layer's (1,024 tokens, 5,504 channels).
2. Whole steps, paired: dense; the model built at the kept width (``step_bench.kept_width_model``: what a
   free slicing would reach); SAT's sliced step alone; SAT's step recording importance with each of the two
   reductions (the step benchmark's SAT step: ``ResolveCache``, ``omit`` with a tracker, ``tracker.update``).
   The order rotates every round; each round gives paired ratios (median and quartiles over rounds).

    .venv/bin/python docs/benchmark/step/small_probe/recording_probe.py 40
"""
import statistics
import sys
import time

import torch

import ds_accel.sat.importance as importance
from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat import ImportanceTracker, omit
from ds_accel.sat.omit import ResolveCache

runtime.keep_freed_memory()
torch.set_num_threads(runtime.usable_cores())
current = importance.channel_magnitude


def vector_norm_statistic(a: torch.Tensor) -> torch.Tensor:
    """The reduction before stop 29."""
    tokens = a.numel() // a.shape[-1]
    return torch.linalg.vector_norm(a, ord=1, dim=tuple(range(a.dim() - 1)), dtype=torch.float32) / tokens


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.3f} | {q[0]:.3f}-{q[2]:.3f}"


print(f"{runtime.cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
print("\nThe channel statistic alone, 30 interleaved calls each (median ms)")
print("| activation | vector_norm(ord=1) | abs + mean | ratio | largest relative difference |\n|---|---|---|---|---|")
for shape in [(8, 128, 344), (1, 1024, 5504)]:
    a = torch.randn(*shape)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(30):
        for name, fn in (("old", vector_norm_statistic), ("new", current)):
            start = time.perf_counter()
            fn(a)
            times[name].append(time.perf_counter() - start)
    old, new = (statistics.median(times[k]) * 1e3 for k in ("old", "new"))
    ref = a.double().abs().flatten(0, -2).mean(0)  # float64 reference
    diff = ((current(a).double() - ref).abs().max() / ref.abs().max()).item()
    print(f"| {tuple(shape)} | {old:.3f} | {new:.3f} | {old / new:.2f}x | {diff:.1e} |")

model, data = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
narrow = step_bench.kept_width_model(model)
optimizers = {"full": adamw(model, OptimConfig(lr=1e-4)), "narrow": adamw(narrow, OptimConfig(lr=1e-4))}
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
kinds = ["dense", "kept-width", "SAT sliced alone", "SAT recording", "SAT recording, old statistic"]
caches = {kind: ResolveCache() for kind in kinds}  # each its own, as each run's would be
trackers = {kind: ImportanceTracker.for_model(model) for kind in ("SAT recording", "SAT recording, old statistic")}


def step(kind: str) -> float:
    importance.channel_magnitude = vector_norm_statistic if kind.endswith("old statistic") else current
    start = time.perf_counter()
    if kind == "kept-width":
        narrow(input_ids=data, labels=data, use_cache=False).loss.backward()
        opt = optimizers["narrow"]
    else:
        keeps = ({}, {}) if kind == "dense" else (keep_heads, keep_channels)
        tracker = trackers.get(kind)
        with omit(model, *keeps, tracker, selection=caches[kind](model, *keeps)):
            model(input_ids=data, labels=data, use_cache=False).loss.backward()
        if tracker is not None:
            tracker.update()
        opt = optimizers["full"]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


for kind in kinds * 2:  # warm-up
    step(kind)
rounds = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
    order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
    rounds.append({kind: step(kind) for kind in order})
print(f"\nsmall preset, 8 x 128 tokens, r = 0.5 (kv_group, adam): {len(rounds)} rounds, order rotating")
print("| step | median ms | dense / it: median, quartiles | it / kept-width: median, quartiles |\n|---|---|---|---|")
for kind in kinds:
    ms = statistics.median(r[kind] for r in rounds) * 1e3
    over_dense = [r["dense"] / r[kind] for r in rounds]
    over_narrow = [r[kind] / r["kept-width"] for r in rounds]
    print(f"| {kind} | {ms:.1f} | {quartiles(over_dense)} | {quartiles(over_narrow)} |")

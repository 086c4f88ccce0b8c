"""Why ``ResolveCache``: ``resolve()`` of the ``small`` preset's 8 layers at r = 0.5 against a cache hit (the
cache comparing the kept indices with the step before's). ``python docs/benchmark/step/small_probe/resolve_probe.py``
on the 2-core CPU; mean over 200 calls after 20 warm-up calls."""

import time

import torch

from ds_accel import step_bench
from ds_accel.sat.omit import ResolveCache, resolve


def per_call_ms(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


model, _ = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
cache = ResolveCache()
print(f"resolve: {per_call_ms(lambda: resolve(model, keep_heads, keep_channels)):.3f} ms")
print(f"ResolveCache hit (same kept indices, new tensors): "
      f"{per_call_ms(lambda: cache(model, {k: v.clone() for k, v in keep_heads.items()}, keep_channels)):.3f} ms")

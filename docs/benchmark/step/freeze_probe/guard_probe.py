"""Where the ``freeze`` guard's time goes, and what stop 26's two changes took off it: the ``small`` preset at
r = 0.5 (``kv_group``, the step benchmark's selection), one process, the trainer's fused AdamW over the
whole parameters (the ZeRO-0 layout: each rank of ZeRO-1/2 guards its own part of the same work). Per
step, interleaved over 30 rounds after a warm-up, median milliseconds of the guard (its ``seconds``:
building the plans when they are not cached, the snapshot before the inner step, the write-back after it)
and of the plain AdamW step beside it:

- ``rebuilt, index_copy_``: as before stop 26, omitted slices and fragment plans built at every step and
  columns written back with ``index_copy_``;
- ``cached, index_copy_``: plans kept with the resolved selection (the trainer's ``SATController`` now);
- ``cached, scatter_``: and columns written back with ``scatter_`` (``_Piece.write`` now).

    .venv/bin/python docs/benchmark/step/freeze_probe/guard_probe.py > docs/benchmark/step/freeze_probe/guard_probe.txt
"""
import statistics
import time

import torch

from ds_accel import runtime, step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat.omit import resolve
from ds_accel.sat.optim_guard import OmittedStateGuard, _Piece, omitted_slices, whole_parameter_fragments

runtime.keep_freed_memory()
torch.set_num_threads(runtime.usable_cores())
model, _ = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
optimizer = adamw(model, OptimConfig(lr=1e-4))
keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
selection = resolve(model, keep_heads, keep_channels)
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
optimizer.step()  # the moments exist
guard = OmittedStateGuard(optimizer)
scatter_write = _Piece.write


def index_copy_write(self, flat, saved):
    block = flat.narrow(0, self.offset, self.rows * self.width).view(self.rows, self.width)
    block.copy_(saved) if self.index is None else block.index_copy_(self.dim, self.index, saved)


cached = (omitted_slices(model, keep_heads, keep_channels, selection=selection), {})


def guarded(kind: str) -> float:
    _Piece.write = scatter_write if kind.endswith("scatter_") else index_copy_write
    if kind.startswith("rebuilt"):
        guard.arm(lambda: whole_parameter_fragments(
            optimizer, omitted_slices(model, keep_heads, keep_channels, selection=selection)))
    else:
        guard.arm(lambda: whole_parameter_fragments(optimizer, *cached))
    guard.seconds = 0.0
    optimizer.step()
    guard.disarm()
    return guard.seconds


def plain(_: str) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


kinds = {"rebuilt, index_copy_": guarded, "cached, index_copy_": guarded, "cached, scatter_": guarded,
         "AdamW step alone": plain}
for kind, fn in kinds.items():
    fn(kind)
times = {kind: [] for kind in kinds}
for _ in range(30):
    for kind, fn in kinds.items():
        times[kind].append(fn(kind) * 1e3)
_Piece.write = scatter_write
print(f"small preset, r = 0.5, {torch.get_num_threads()} threads, {len(cached[0])} omitted slices "
      f"(each with the weight and its two moments); median of 30 interleaved rounds")
print("| guard | ms per step | range |\n|---|---|---|")
for kind, values in times.items():
    print(f"| {kind} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")

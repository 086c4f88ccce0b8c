"""ZeRO-Offload steps AdamW on host-memory fp32 tensors. Which optimizer should do it: torch's fused AdamW
(ds_accel's optimizer everywhere else; no build step) or DeepSpeed's ``DeepSpeedCPUAdam`` (a C++ op that
DeepSpeed JIT-builds at its first use, which needs a compiler on every node)? Time of one step over 50M
fp32 parameters (a large ZeRO partition's sub-group) on this machine's threads, median of 10 steps after
two warm-up steps, the two interleaved; then how far apart their parameters are after those 12 steps
from the same start and gradient (largest difference, in units of the learning rate).

    .venv/bin/python docs/benchmark/step/adamw_probe/offload_probe.py > docs/benchmark/step/adamw_probe/offload_probe.txt
"""
import statistics
import time

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from ds_accel import runtime

torch.set_num_threads(runtime.usable_cores())
N, LR = 50_000_000, 1e-3
start, grad = torch.randn(N, generator=torch.Generator().manual_seed(0)), torch.randn(N)


def make(kind: str) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(start.clone())
    p.grad = grad.clone()
    if kind == "torch AdamW, fused":
        return p, torch.optim.AdamW([p], lr=LR, weight_decay=0.1, fused=True)
    return p, DeepSpeedCPUAdam([p], lr=LR, weight_decay=0.1, adamw_mode=True)


optimizers = {kind: make(kind) for kind in ("torch AdamW, fused", "DeepSpeedCPUAdam")}
for _, optimizer in optimizers.values():  # warm-up
    optimizer.step()
    optimizer.step()
times: dict[str, list[float]] = {kind: [] for kind in optimizers}
for _ in range(10):
    for kind, (_, optimizer) in optimizers.items():
        t = time.perf_counter()
        optimizer.step()
        times[kind].append(time.perf_counter() - t)
print(f"AdamW step over {N / 1e6:.0f}M fp32 parameters in host memory, {torch.get_num_threads()} threads, "
      "median of 10 interleaved steps")
print("| optimizer | ms per step |\n|---|---|")
for kind, ts in times.items():
    print(f"| {kind} | {statistics.median(ts) * 1e3:.1f} |")
a, b = (p.detach() for p, _ in optimizers.values())
print(f"after 12 steps from the same start and gradient: largest difference {(a - b).abs().max().item() / LR:.2e} lr")

"""How long torch's AdamW step takes on one Llama-2-7B decoder layer's matrices (202M fp32 parameters)
with each of its three implementations, on this machine's threads: the per-tensor loop (torch's CPU
default), ``foreach`` and ``fused`` (what ds_accel's trainer and step benchmark use). Median of 5
steps after one warm-up step, the three interleaved.

    .venv/bin/python docs/benchmark/step/adamw_probe/probe.py > docs/benchmark/step/adamw_probe/adamw_probe.txt
"""
import statistics
import time

import torch

from ds_accel import runtime

torch.set_num_threads(runtime.usable_cores())
torch.manual_seed(0)
H, M = 4096, 11008  # Llama-2-7B: q, k, v, o are H x H; gate, up are M x H; down is H x M
params = [torch.nn.Parameter(torch.randn(H, H)) for _ in range(4)]
params += [torch.nn.Parameter(torch.randn(M, H)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(H, M))]
for p in params:
    p.grad = torch.randn_like(p)
kinds = {"per-tensor loop (CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
optimizers = {k: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw) for k, kw in kinds.items()}
times = {k: [] for k in kinds}
for rep in range(6):
    for k, opt in optimizers.items():
        start = time.perf_counter()
        opt.step()
        if rep:
            times[k].append(time.perf_counter() - start)
n = sum(p.numel() for p in params)
print(f"AdamW step over {n / 1e6:.0f}M fp32 parameters, {torch.get_num_threads()} threads, torch {torch.__version__}")
base = statistics.median(times[next(iter(kinds))])
for k, v in times.items():
    med = statistics.median(v)
    print(f"{k:32s} {med * 1e3:8.0f} ms  ({base / med:.1f}x)   reps: {', '.join(f'{t * 1e3:.0f}' for t in v)}")

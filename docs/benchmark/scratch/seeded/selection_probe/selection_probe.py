"""How often SAT's selection changes: the kept heads and channels saved in consecutive checkpoints of
a run (``run.save_every``), as its SAT state (``extra_rank0.pt``, key ``sat``) holds them.

    .venv/bin/python docs/benchmark/scratch/seeded/selection_probe/selection_probe.py RUN_DIR/checkpoints
"""
import os
import sys

import torch

base = sys.argv[1]
steps = sorted(int(d[4:]) for d in os.listdir(base) if d.startswith("step"))
prev = None
for step in steps:
    sat = torch.load(f"{base}/step{step:06d}/extra_rank0.pt", weights_only=False)["sat"]
    cur = ({k: tuple(v.tolist()) for k, v in sat["keep_heads"].items()},
           {k: tuple(v.tolist()) for k, v in sat["keep_channels"].items()})
    if prev is not None:
        same_h = sum(cur[0].get(k) == prev[0].get(k) for k in cur[0])
        same_c = sum(cur[1].get(k) == prev[1].get(k) for k in cur[1])
        ch = [len(set(cur[1][k]) & set(prev[1].get(k, ()))) / max(1, len(cur[1][k])) for k in cur[1]]
        print(f"step {step:4d} rate {sat['rate']:.3f}: layers with identical heads {same_h}/{len(cur[0])}, channels "
              f"{same_c}/{len(cur[1])}; kept channels shared with the previous checkpoint {[round(x, 2) for x in ch]}")
    prev = cur

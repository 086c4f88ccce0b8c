"""Run a function on N real gloo ranks (torch.multiprocessing.spawn), DeepSpeed's tests' way.

Every rank runs under ``collective_check.CollectiveCheck``: a collective that would get a host tensor
(or a dtype NCCL lacks) on a CUDA machine fails the run, with every violation and its call site.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from collective_check import CollectiveCheck, enabled
    from ds_accel import runtime

    with CollectiveCheck() if enabled() else nullcontext() as check:  # before init: DeepSpeed binds collectives
        runtime.init_distributed()
        result = fn(*args)
    runtime.shutdown()
    if check is not None and check.violations:
        raise AssertionError(f"rank {rank}: collectives that NCCL would refuse:\n{check.report()}")
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    os._exit(0)  # gloo can abort in interpreter teardown


def run_ranks(fn, world: int, *args) -> list:
    """fn(*args) on ``world`` ranks; returns each rank's (picklable) result."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), out, fn, args), nprocs=world, join=True)
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(world)]

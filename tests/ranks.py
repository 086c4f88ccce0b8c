"""Run a function on N real gloo ranks (torch.multiprocessing), DeepSpeed's tests' way.

Ranks are forked from a forkserver that has imported torch, DeepSpeed, transformers and the trainer
once per test session (``PRELOAD``): a spawned rank spent 7.5-9.2 s importing them on the 2-core
machine (docs/examples/make_test_timing.txt), at every launch of every multi-rank test. The server is a
fresh process that only imported (no tensors, no process group; its one thread besides the main one is
the BLAS pool numpy starts, which OpenBLAS re-creates after a fork); each rank still starts its own
process group, gets the caller's environment as it is at the launch, and exits after one function.

Every rank runs under ``collective_check.CollectiveCheck``: a collective that would get a host tensor
(or a dtype NCCL lacks) on a CUDA machine fails the run, with every violation and its call site.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "deepspeed", "transformers", "ds_accel.trainer", "collective_check"]


def _output_to_files(out: str, rank: int) -> None:
    """This rank's stdout / stderr into files the caller echoes: a forked rank's own are the forkserver's,
    which pytest's per-test capture (capfd) does not see."""
    for fd, name in ((1, "out"), (2, "err")):
        handle = os.open(Path(out, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)


def _worker(rank: int, world: int, port: int, out: str, payload: bytes, env: dict[str, str]) -> None:
    os.environ.clear()  # the forkserver's environment is the one of its start, not the caller's now
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    _output_to_files(out, rank)
    import torch

    torch.set_num_threads(1)
    from collective_check import CollectiveCheck, enabled
    from ds_accel import runtime

    fn, args = pickle.loads(payload)
    with CollectiveCheck() if enabled() else nullcontext() as check:  # before init: DeepSpeed binds collectives
        runtime.init_distributed()
        result = fn(*args)
    runtime.shutdown()
    if check is not None and check.violations:
        raise AssertionError(f"rank {rank}: collectives that NCCL would refuse:\n{check.report()}")
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort in interpreter teardown


def run_ranks(fn, world: int, *args) -> list:
    """fn(*args) on ``world`` ranks; returns each rank's (picklable) result. The ranks' output is echoed to
    this process's stdout / stderr, rank by rank, once they have finished."""
    mp.set_forkserver_preload(PRELOAD)  # read when the server starts: at the session's first launch
    # plain pickle: torch's multiprocessing pickler would pass every tensor in args as a file descriptor,
    # and a forkserver takes at most 256 of them
    payload = pickle.dumps((fn, args))
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_worker, args=(world, _free_port(), out, payload, dict(os.environ)), nprocs=world,
                               join=True, start_method="forkserver")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for rank in range(world):
                for fd, name in ((1, "out"), (2, "err")):
                    path = Path(out, f"rank{rank}.{name}")
                    if path.exists():
                        with os.fdopen(os.dup(fd), "wb") as echo:  # the fd, as a rank's own output went before
                            echo.write(path.read_bytes())
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(world)]

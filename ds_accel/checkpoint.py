"""Atomic checkpoints: DeepSpeed's own engine checkpoint plus the run's state, behind one pointer.

Layout under ``<output_dir>/checkpoints``::

    step000120/                 DeepSpeed's save_checkpoint (model, optimizer, ZeRO partitions)
    step000120/run_state.json   step, V-cycle stage, metrics history (rank 0)
    step000120/extra_rank{r}.pt per-rank tensors: kept large-model shards, SAT statistics
    latest                      the tag of the newest complete checkpoint

``latest`` is replaced (write + ``os.replace``) only after every rank has finished writing, so a
crash while saving leaves the previous checkpoint as the one that loads. DeepSpeed's own
``latest`` file is not used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import runtime

POINTER = "latest"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, root: Path, step: int, run_state: dict[str, Any], extra: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = f"step{step:06d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = runtime.rank()
    buf_path = root / tag / f"extra_rank{rank}.pt"
    torch.save(extra, buf_path.with_suffix(".tmp"))
    os.replace(buf_path.with_suffix(".tmp"), buf_path)
    if rank == 0:
        _atomic_write(root / tag / "run_state.json", json.dumps(run_state).encode())
    _barrier()
    if rank == 0:
        _atomic_write(root / POINTER, tag.encode())
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    _barrier()
    return root / tag


def latest(root: Path) -> str | None:
    pointer = root / POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def read_run_state(root: Path, tag: str) -> dict[str, Any]:
    return json.loads((root / tag / "run_state.json").read_text())


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Load the engine state of ``tag`` into ``engine`` (built at the right level) and return this
    rank's extra tensors."""
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    extra_path = root / tag / f"extra_rank{runtime.rank()}.pt"
    if not extra_path.is_file():
        raise RuntimeError(f"{extra_path} is missing: resume with the same number of ranks as the saved run")
    return torch.load(extra_path, weights_only=False)

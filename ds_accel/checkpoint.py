"""Atomic checkpoints: DeepSpeed's own engine checkpoint plus the run's state, behind one pointer.

Layout under ``<output_dir>/checkpoints``::

    step000120/                 DeepSpeed's save_checkpoint (model, optimizer, ZeRO partitions)
    step000120/run_state.json   step, V-cycle stage, metrics history (rank 0)
    step000120/layout.json      the parallel layout it was written on, Adam step (``engine.elastic``)
    step000120/extra_rank{r}.pt per-rank tensors: kept large-model shards, SAT statistics
    step000120.to-<layout>/     the same checkpoint converted for another layout (``engine.elastic``)
    latest                      the tag of the newest complete checkpoint

``latest`` is replaced (write + ``os.replace``) only after every rank has finished writing, so a
crash while saving leaves the previous checkpoint as the one that loads. DeepSpeed's own
``latest`` file is not used. An old checkpoint is deleted with its conversions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import runtime

POINTER = "latest"
LAYOUT = "layout.json"
_TAG = re.compile(r"step\d+")


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


def save(engine, root: Path, step: int, run_state: dict[str, Any], extra: dict[str, Any], keep: int,
         layout: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it at the same step. ``layout``: ``engine.elastic.record``'s, for a
    resume on another layout."""
    tag = f"step{step:06d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = runtime.rank()
    buf_path = root / tag / f"extra_rank{rank}.pt"
    torch.save(extra, buf_path.with_suffix(".tmp"))
    os.replace(buf_path.with_suffix(".tmp"), buf_path)
    if rank == 0:
        _atomic_write(root / tag / "run_state.json", json.dumps(run_state).encode())
        if layout is not None:
            _atomic_write(root / tag / LAYOUT, json.dumps(layout).encode())
        for stale in root.glob(f"{tag}.to-*"):  # conversions of an earlier checkpoint of this step
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    if rank == 0:
        _atomic_write(root / POINTER, tag.encode())
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name))
        for old in tags[:-keep]:
            for path in [root / old, *root.glob(f"{old}.to-*")]:
                shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return root / tag


def latest(root: Path) -> str | None:
    pointer = root / POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def read_run_state(root: Path, tag: str) -> dict[str, Any]:
    return json.loads((root / tag / "run_state.json").read_text())


def read_layout(root: Path, tag: str) -> dict[str, Any] | None:
    """The checkpoint's ``layout.json`` (None: written before layouts were recorded)."""
    path = root / tag / LAYOUT
    return json.loads(path.read_text()) if path.is_file() else None


def load_engine(engine, root: Path, tag: str) -> None:
    """Load the DeepSpeed state of ``tag`` into ``engine`` (built at the right level, on the same layout)."""
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")


def load_extra(directory: Path, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s extra tensors (kept shards, SAT state) of a checkpoint directory."""
    return torch.load(directory / f"extra_rank{rank}.pt", weights_only=False)


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Load the engine state of ``tag`` into ``engine`` and return this rank's extra tensors (same layout)."""
    load_engine(engine, root, tag)
    return load_extra(root / tag, runtime.rank())

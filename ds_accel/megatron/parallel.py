"""Megatron's tensor parallelism inside a DeepSpeed process: process groups and DeepSpeed's ``mpu``.

:func:`init_parallel` starts torch.distributed the way every ds_accel run does (DeepSpeed's
``init_distributed``: gloo on DeepSpeed's CPU accelerator, NCCL on CUDA) and then Megatron's
``parallel_state`` with TP groups of consecutive ranks (Megatron's order "tp-...-dp"), the same
layout as AutoTP: the data sampler shards by ``rank // tp`` over ``world // tp`` data-parallel ranks.

:data:`mpu` is ``megatron.core.parallel_state`` as DeepSpeed's ``deepspeed.initialize(mpu=...)``
reads it: DeepSpeed (0.19) still calls the pre-0.9 names ``get_model_parallel_rank`` /
``get_model_parallel_world_size`` (checkpoint file names, gradient-norm bookkeeping) that
megatron-core 0.16 no longer has; without pipeline stages the model-parallel group is the TP group.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from .. import runtime
from . import _cpu


def init_parallel(tp_size: int, seed: int = 0) -> None:
    """torch.distributed (DeepSpeed's accelerator decides gloo / NCCL) + Megatron's TP groups; idempotent.

    ``seed`` seeds Megatron's model-parallel RNG tracker on CUDA (dropout in TP regions); on CPU the
    shims of :mod:`ds_accel.megatron._cpu` apply instead.
    """
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron's TP overlaps its all-reduces assuming it
    runtime.init_distributed()
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and not _cpu.needed():
        raise RuntimeError("model.backend megatron: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) on a machine "
                           "with CUDA; Megatron's layers place buffers on the CUDA device: unset DS_ACCELERATOR")
    _cpu.install()
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"parallel.tp: {tp_size} must be >= 1 and divide the {world} ranks")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp_size:
            raise RuntimeError(f"init_parallel: Megatron's parallel state already has tp="
                               f"{parallel_state.get_tensor_model_parallel_world_size()}, asked for {tp_size}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, create_gloo_process_groups=False)
    if not on_cpu:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_world() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group() -> Any:
    return parallel_state.get_tensor_model_parallel_group()


class _MegatronMPU:
    """``parallel_state`` plus the model-parallel names DeepSpeed still calls (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(parallel_state, name)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return parallel_state.get_tensor_model_parallel_world_size()


mpu = _MegatronMPU()


@torch.no_grad()
def all_gather_tp(local: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's ``local`` (equal shapes), in TP-rank order (collective over the TP group)."""
    if tp_world() == 1:
        return [local]
    parts = [torch.empty_like(local) for _ in range(tp_world())]
    dist.all_gather(parts, local.contiguous(), group=tp_group())
    return parts


__all__ = ["all_gather_tp", "init_parallel", "mpu", "tp_group", "tp_rank", "tp_world"]

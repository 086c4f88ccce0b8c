"""Full-parameter access that works the same under ZeRO 0, 1, 2 and 3, in fp32 or bf16.

Reads return the fp32 master weight where DeepSpeed keeps one (``safe_get_full_fp32_param``), so
a level transition never rounds through the 16-bit copy; writes set both the master and the
16-bit model copy. Both are collective under ZeRO (all-reduce of fragments / gather of shards):
every rank must call them for the same parameters in the same order, one parameter at a time,
which is what bounds a transition's extra memory to about one parameter.

Under tensor parallelism (AutoTP) a split parameter's ZeRO machinery only knows this rank's block:
reads gather the blocks over the TP group into the full tensor, writes keep this rank's block of
the full value, so callers (level transitions, export) see the same full tensors at any TP degree.
"""

from __future__ import annotations

import torch
from deepspeed import zero
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from ..parallel.tensor import gather_tp, local_tp, tp_split


def is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole parameter in fp32 on every rank (a fresh tensor, safe to keep)."""
    local, split = _zero_full_param(p), tp_split(p)
    return local if split is None else gather_tp(split, local)


def _zero_full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The parameter as this rank's model holds it (its TP block), gathered over ZeRO, in fp32."""
    master = safe_get_full_fp32_param(p)
    if master is not None:
        return master.detach().float().clone()
    if is_zero3(p):  # before the first optimizer step a ZeRO-3 param may have no optimizer yet
        with zero.GatheredParameters([p]):
            return p.detach().float().clone()
    return p.detach().float().clone()


def write_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write the model's own copy (every rank passes the same ``value``); ZeRO-3 keeps each rank's shard.

    ``modifier_rank=0``: DeepSpeed re-partitions from rank 0's gathered copy on exit (``None``
    would discard the write).
    """
    if is_zero3(p):
        with zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.dtype))
    else:
        p.data.copy_(value.to(p.dtype))


def set_full_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write the full ``value`` into the master weight (if any) and into the model's own copy."""
    split = tp_split(p)
    if split is not None:
        value = local_tp(split, value)
    safe_set_full_fp32_param(p, value.float())
    write_param(p, value)


def shard_of(value: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous 1/world of the flattened tensor (the last shard may be shorter)."""
    flat = value.reshape(-1)
    size = -(-flat.numel() // world)
    return flat[rank * size:(rank + 1) * size].clone()


def unshard(shard: torch.Tensor, shape: torch.Size, group=None) -> torch.Tensor:
    """Inverse of :func:`shard_of`: all-gather the shards of every rank and restore ``shape``."""
    import torch.distributed as dist

    world = dist.get_world_size(group) if dist.is_initialized() else 1
    numel = int(torch.Size(shape).numel())
    size = -(-numel // world)
    padded = torch.zeros(size, dtype=shard.dtype, device=shard.device)
    padded[:shard.numel()] = shard
    if world == 1:
        return padded[:numel].reshape(shape)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:numel].reshape(shape)

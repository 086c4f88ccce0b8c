"""The structure of a decoder model that SAT, the multi-level operators and the parallel layouts share.

Below both ``ds_accel.sat`` and ``ds_accel.parallel``: where a model's decoder layers are, which
rows of a projection belong to a head, and which block of heads and channels a tensor-parallel
rank holds. No DeepSpeed here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig

KeepDict = Mapping[int, Tensor]  # {layer index: kept query-head / channel indices}


def decoder_layers(model_or_layers: Any) -> dict[int, nn.Module]:
    """The decoder layers by layer index.

    Accepts a ``LlamaForCausalLM`` (``model.model.layers``), a ``LlamaModel`` (``model.layers``), a
    wrapper exposing either under ``.module`` (DeepSpeed engine, DDP), a list of layers (keys are list
    positions) or a mapping {layer index: layer} (a pipeline stage keyed by global layer indices).
    """
    obj = model_or_layers
    while True:
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, (Sequence, nn.ModuleList)):
            return dict(enumerate(obj))
        if hasattr(obj, "model") and hasattr(obj.model, "layers"):
            return dict(enumerate(obj.model.layers))
        if hasattr(obj, "layers"):
            return dict(enumerate(obj.layers))
        if not hasattr(obj, "module"):
            raise TypeError(f"cannot find decoder layers in {type(model_or_layers).__name__}")
        obj = obj.module


def unique_indices(kept: Tensor, n: int, what: str) -> Tensor:
    """``kept`` as sorted unique int64 indices, checked to be a non-empty subset of range(n)."""
    kept = torch.unique(torch.as_tensor(kept, dtype=torch.long))
    if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= n:
        raise ValueError(f"{what}: kept indices must be a non-empty subset of range({n}), got {kept.tolist()}")
    return kept


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Feature indices (rows of q/k/v_proj, columns of o_proj) of the given heads: blocks of head_dim."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


@dataclass(frozen=True)
class TensorShard:
    """This rank's block of every decoder layer under tensor parallelism, and the two collectives.

    ``heads`` / ``channels``: the global query heads and MLP channels whose rows of q_proj (and of
    k/v_proj for their KV heads) / gate_proj, up_proj and columns of o_proj / down_proj this rank
    holds, as local blocks starting at row / column 0. With GQA a block holds whole KV groups.
    ``enter(x)``: identity on the replicated input of the column-parallel projections; its backward
    sums the input gradient over the TP group (each rank's rows only see part of it).
    ``reduce(y)``: sums the row-parallel partial outputs over the TP group; backward identity.
    Every rank must call both in every layer, also when it keeps none of its units.
    """

    heads: range
    channels: range
    enter: Callable[[Tensor], Tensor]
    reduce: Callable[[Tensor], Tensor]


def in_block(kept: Tensor, block: range) -> Tensor:
    """The kept indices that fall in ``block``, relative to its start (this rank's local indices)."""
    return kept[(kept >= block.start) & (kept < block.stop)] - block.start


@dataclass(frozen=True)
class UnitShape:
    """The unit counts of one decoder layer that SAT, the layouts and the FLOPs count need: query heads,
    KV heads, head_dim, MLP channels (whole model, not one tensor-parallel rank's block)."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def groups(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, config: LlamaConfig) -> UnitShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_attention_heads, config.num_key_value_heads, head_dim, config.intermediate_size)


__all__ = ["KeepDict", "TensorShard", "UnitShape", "decoder_layers", "head_rows", "in_block", "unique_indices"]

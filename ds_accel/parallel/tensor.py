"""Tensor parallelism for a HF Llama by DeepSpeed AutoTP training, and what SAT and level transitions need.

``"tensor_parallel": {"autotp_size": tp}`` in the DeepSpeed config (ds_configs/tp2.json) makes
``deepspeed.initialize`` replace the model's linear layers by Megatron-style shards:

* q/k/v_proj, gate/up_proj: split by output rows (column parallel). AutoTP splits the KV heads over
  the ranks and the query heads with them, so a rank holds a contiguous block of whole GQA groups;
  the MLP channels are split into contiguous blocks too;
* o_proj, down_proj: split by input columns (row parallel); the partial outputs are summed by an
  all-reduce over the TP group and the replicated bias is added once;
* the tied embedding / LM head: split by vocabulary rows; the RMSNorm weights are replicated.

TP groups are consecutive ranks (DeepSpeed's mesh is data_parallel x tensor_parallel, TP inner): the
ranks of one group must see the same batch, the data sampler shards by ``rank // tp`` over
``world // tp`` data-parallel ranks.

This module reads that layout off the replaced modules (their ``tp_index``, ``mp_group`` and the
split each parameter carries for universal checkpoints) and offers: :func:`validate_tp`, the shape
check before any engine exists; :func:`tensor_parallel`, this rank's :class:`TensorShard` for SAT's
sliced forward; :func:`tp_split`, :func:`gather_tp` and :func:`local_tp` for one parameter, used by
``engine.params.full_param`` / ``set_full_param`` so that level transitions see full tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
from deepspeed.module_inject.layers import ColumnParallel, RowParallel
from deepspeed.utils import groups
from torch import Tensor
from transformers import LlamaConfig

from ..config import ConfigError
from ..ds_private import autotp_layer
from ..structure import TensorShard, decoder_layers


def validate_tp(config: LlamaConfig, tp: int, levels_configs: Sequence[LlamaConfig] = ()) -> None:
    """Refuse a TP degree that does not split the model and every V-cycle level evenly.

    AutoTP gives each rank whole KV groups, so tp must divide the KV heads (and with them the query
    heads). AutoTP could split the MLP unevenly (345 -> 173/172), but SAT's balanced selection keeps
    the same number of channels per rank, which needs equal blocks: tp must divide the intermediate
    size too. ``levels_configs``: the configs of levels 1..N (``multilevel.vcycle.level_configs``);
    every level is its own TP engine, and a coalesced level halves heads and channels.
    """
    if tp < 1:
        raise ConfigError(f"parallel.tp: must be >= 1, got {tp}")
    levels = [("the model", config)] + [(f"V-cycle level {i}", c) for i, c in enumerate(levels_configs, 1)]
    units = [n for _, c in levels for n in (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)]
    for where, c in levels:
        for what, n in (("attention heads", c.num_attention_heads), ("KV heads", c.num_key_value_heads),
                        ("MLP channels (intermediate_size)", c.intermediate_size)):
            if n % tp:
                divisors = [d for d in range(1, math.gcd(*units) + 1) if math.gcd(*units) % d == 0]
                fewer = " (or use fewer multilevel.levels)" if c is not config else ""
                raise ConfigError(f"parallel.tp: {tp} does not divide the {n} {what} of {where}; use a tp that "
                                  f"divides every level's heads, KV heads and MLP channels: "
                                  f"{', '.join(map(str, divisors))}{fewer}")


@dataclass(frozen=True)
class TPSplit:
    """How AutoTP split one parameter: along ``dim`` into blocks of ``sizes``; this rank holds block ``index``."""

    dim: int
    sizes: tuple[int, ...]
    index: int
    group: Any  # the TP process group

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.index])

    @property
    def size(self) -> int:
        return self.sizes[self.index]


def tp_split(p: torch.nn.Parameter) -> TPSplit | None:
    """The split of a parameter of an AutoTP-replaced layer; None for a replicated (or plain) parameter.

    The layer binds its ``gather_params`` to the parameters it splits (which gives its ``tp_index``
    and TP group), and records on each one the split dimension and block sizes for universal
    checkpoints. Fused sub-parameters (a packed qkv) are not a Llama layout and are refused.
    """
    meta = getattr(p, DS_AUTOTP_UC_META, None)
    layer = autotp_layer(p)
    if meta is None or layer is None or meta["replicated"] or meta["partition_dim"] is None:
        return None
    if meta["sub_param_shape"] is not None:
        raise NotImplementedError("tp_split: fused sub-parameters (packed qkv) are not supported")
    if layer.tp_world_size == 1:
        return None
    return TPSplit(meta["partition_dim"], tuple(meta["partition_sizes"]), layer.tp_index, layer.mp_group)


@torch.no_grad()
def gather_tp(split: TPSplit, local: Tensor) -> Tensor:
    """The full tensor from every TP rank's block ``local`` (collective over the TP group).

    Blocks may differ in size (an uneven split): each is padded to the largest for the all-gather.
    """
    widest = max(split.sizes)
    shape = list(local.shape)
    shape[split.dim] = widest
    padded = local.new_zeros(shape)
    padded.narrow(split.dim, 0, local.shape[split.dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in split.sizes]
    dist.all_gather(parts, padded, group=split.group)
    return torch.cat([part.narrow(split.dim, 0, n) for part, n in zip(parts, split.sizes)], dim=split.dim)


def local_tp(split: TPSplit, full: Tensor) -> Tensor:
    """This rank's block of a full tensor (a view)."""
    return full.narrow(split.dim, split.start, split.size)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel layout of one model.

    ``shard``: its block of heads and channels and the two collectives, for ``ds_accel.sat.omit``;
    ``group`` / ``size``: the TP group; ``data_group``: the data-parallel group (same TP index).
    """

    shard: TensorShard
    group: Any
    size: int
    data_group: Any


def _row_parallel_sum(group: Any, y: Tensor) -> Tensor:
    return RowParallel.apply(group, y, False)


def tensor_parallel(model: Any) -> TensorParallel | None:
    """The TP layout of a model after ``deepspeed.initialize`` (None without tensor parallelism).

    Read off the first decoder layer (all layers have the same shape) and checked to be the layout
    the sliced forward assumes: q and o split into the same blocks of whole heads, k/v holding the
    KV heads of exactly those query heads, gate/up and down into the same blocks of channels.
    """
    layer = next(iter(decoder_layers(model).values()))
    attn, mlp = layer.self_attn, layer.mlp
    q = tp_split(attn.q_proj.weight)
    if q is None:
        return None
    splits = {name: tp_split(getattr(module, name).weight) for module, names in
              ((attn, ("k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names}
    config, head_dim = attn.config, attn.head_dim
    group_size = config.num_attention_heads // config.num_key_value_heads
    heads = range(q.start // head_dim, (q.start + q.size) // head_dim)
    kv = splits["k_proj"]
    gate = splits["gate_proj"]
    expected = (q.sizes, kv.sizes, gate.sizes)
    found = (splits["o_proj"].sizes, splits["v_proj"].sizes, splits["up_proj"].sizes)
    whole_groups = (q.start % (head_dim * group_size) == 0 and q.size % (head_dim * group_size) == 0
                    and kv.start * group_size == q.start and kv.size * group_size == q.size)
    if not whole_groups or expected != found or splits["down_proj"].sizes != gate.sizes:
        raise NotImplementedError(f"tensor_parallel: unexpected AutoTP layout (q {q.sizes}, k/v {kv.sizes}, "
                                  f"o {splits['o_proj'].sizes}, gate {gate.sizes}, down {splits['down_proj'].sizes})")
    shard = TensorShard(heads=heads, channels=range(gate.start, gate.start + gate.size),
                        enter=partial(ColumnParallel.apply, q.group), reduce=partial(_row_parallel_sum, q.group))
    return TensorParallel(shard, q.group, len(q.sizes), groups.get_data_parallel_group())


def tp_size(ds: dict) -> int:
    """The AutoTP degree a DeepSpeed config asks for (1: no tensor parallelism)."""
    return int(ds.get("tensor_parallel", {}).get("autotp_size", 1) or 1)


__all__ = ["TPSplit", "TensorParallel", "gather_tp", "local_tp", "tensor_parallel", "tp_size", "tp_split",
           "validate_tp"]

"""Keeping omitted units out of the optimizer step (SAT, Ma et al., 2024; our policy).

An omitted row gets a zero gradient, yet AdamW would still move it: weight decay shrinks it, the first
moment keeps pushing it (m <- b1 m, update m_hat / (sqrt(v_hat) + eps)) and both moments decay. SAT
omits a unit from the step entirely, so :func:`guard_omitted` saves, before ``optimizer.step()``, the
omitted rows / columns of every affected parameter and of its per-element state tensors (AdamW:
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; any state tensor of the parameter's shape), and writes
them back after: omitted weights and moments are bit-identical to before the step.

The one shared quantity is the per-tensor ``step`` counter used for bias correction: it advances for
the whole tensor, so when an omitted row comes back, its moments are bias-corrected as if they had been
updated every step (1 - b^t is ~1 after the first few hundred steps, so this matters only at the start).
State that the step creates (a parameter's first step) is left as the optimizer made it; for Adam,
zero gradients leave zero moments, the same as their initial value.

:func:`omitted_slices` is the pure mapping (parameter -> dim and omitted indices) that an engine with
its own optimizer-state accessors (ZeRO partitions) reuses.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ds_accel.sat.omit import HeadSelection
from ds_accel.structure import (KeepDict, TensorShard, decoder_layers, head_rows, in_block,
                               unique_indices)


@dataclass(frozen=True)
class OmittedSlice:
    """Rows (dim 0) or columns (dim 1) of one parameter that a step omits.

    layer: decoder layer index; name: parameter name within the layer (e.g. "self_attn.q_proj.weight");
    index: omitted indices along ``dim``, sorted, on the parameter's device.
    """

    layer: int
    name: str
    param: Tensor
    dim: int
    index: Tensor


def _complement(kept: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


def omitted_slices(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
                   shard: TensorShard | None = None) -> list[OmittedSlice]:
    """Every omitted parameter slice of a selection (the inverse view of :func:`omit`).

    Heads: rows of q_proj (weight, bias) of the omitted query heads, rows of k_proj / v_proj of the KV
    heads no kept query head uses, columns of o_proj.weight of the omitted query heads. Channels: rows
    of gate_proj / up_proj (weight, bias), columns of down_proj.weight. The output biases of o_proj and
    down_proj always take part and are never omitted.

    ``shard`` (tensor parallelism): this rank's block of heads and channels; the selection is global,
    the slices index the rows / columns of the block this rank holds.
    """
    slices: list[OmittedSlice] = []
    for index, layer in decoder_layers(model_or_layers).items():
        parts: list[tuple[str, int, Tensor]] = []
        attn, mlp = layer.self_attn, layer.mlp
        n_heads = attn.config.num_attention_heads if shard is None else len(shard.heads)
        n_channels = mlp.intermediate_size if shard is None else len(shard.channels)
        groups = attn.config.num_attention_heads // attn.config.num_key_value_heads
        if index in keep_heads:
            heads = HeadSelection.of(attn, keep_heads[index])
            if shard is not None:
                heads = HeadSelection.from_heads(in_block(heads.q_heads, shard.heads), groups, attn.head_dim)
            q_rows = head_rows(_complement(heads.q_heads, n_heads), attn.head_dim)
            kv_rows = head_rows(_complement(heads.kv_heads, n_heads // groups), attn.head_dim)
            parts += [("self_attn.q_proj", 0, q_rows), ("self_attn.k_proj", 0, kv_rows),
                      ("self_attn.v_proj", 0, kv_rows), ("self_attn.o_proj", 1, q_rows)]
        if index in keep_channels:
            kept = unique_indices(keep_channels[index], mlp.intermediate_size, f"layer {index} channels")
            kept = kept.to(mlp.down_proj.weight.device)
            omitted = _complement(kept if shard is None else in_block(kept, shard.channels), n_channels)
            parts += [("mlp.gate_proj", 0, omitted), ("mlp.up_proj", 0, omitted), ("mlp.down_proj", 1, omitted)]
        for module_name, dim, omitted in parts:
            linear = layer.get_submodule(module_name)
            names = ["weight"] + (["bias"] if dim == 0 and linear.bias is not None else [])
            slices += [OmittedSlice(index, f"{module_name}.{name}", getattr(linear, name), dim, omitted)
                       for name in names if omitted.numel()]
    return slices


@contextmanager
def guard_omitted(optimizer: torch.optim.Optimizer, slices: Sequence[OmittedSlice]) -> Iterator[None]:
    """Around ``optimizer.step()``: omitted slices of parameters and per-element state stay bit-identical.

    Usage: ``with guard_omitted(opt, omitted_slices(model, keep_heads, keep_channels)): opt.step()``.
    """
    saved: list[tuple[OmittedSlice, str | None, Tensor]] = []
    with torch.no_grad():
        for s in slices:
            state = optimizer.state.get(s.param, {})
            tensors = {None: s.param} | {key: value for key, value in state.items()
                                         if torch.is_tensor(value) and value.shape == s.param.shape}
            saved += [(s, key, tensor.index_select(s.dim, s.index)) for key, tensor in tensors.items()]
    yield
    with torch.no_grad():
        for s, key, values in saved:
            target = s.param if key is None else optimizer.state[s.param][key]
            target.index_copy_(s.dim, s.index, values)


__all__ = ["OmittedSlice", "guard_omitted", "omitted_slices"]

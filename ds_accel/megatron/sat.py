"""Sparsity-Accelerated Training on Megatron-core decoder layers: the Megatron half of ``ds_accel.sat.omit``.

The same meaning as for HF Llama (``ds_accel.sat.omit`` / ``optim_guard``), on Megatron's fused layout
(``ds_accel.megatron.layout``): a selection {layer: kept query heads / MLP channels, global indices}
makes each layer compute only its kept units, as dense GEMMs of a smaller size:

* attention: one GEMM on the rows of the fused ``linear_qkv`` that hold the kept query heads and the
  KV heads they use (their GQA groups), in Megatron's interleaved order; Megatron's RoPE on those
  heads; scaled-dot-product attention; ``linear_proj`` on the matching input columns;
* MLP: one GEMM on the gate and up rows of the kept channels of ``linear_fc1`` (``[gate_r; up_r]``),
  ``silu(gate) * up``, ``linear_fc2`` on the matching columns.

Under Megatron tensor parallelism a :class:`~ds_accel.structure.TensorShard` (:func:`tensor_shard`)
says which heads and channels this rank holds; the selection stays global, each rank computes the
kept units of its block, and the partial outputs are summed over the TP group
(``reduce_from_tensor_model_parallel_region``; the input enters through
``copy_to_tensor_model_parallel_region``, whose backward sums the input gradient), exactly as
Megatron's Column/RowParallelLinear do. A rank that keeps none of a layer's units still takes part
in both collectives (``0 * x``).

Importance is recorded as for HF: the sliced attention output (``linear_proj``'s input) and the
SwiGLU activation (``linear_fc2``'s input) of the kept units, or on a dense half a forward pre-hook
on ``linear_proj`` / ``linear_fc2`` (this rank's block under TP); ``record(activation, kept, weight)``
with ``weight`` the output projection's columns of the recorded units.

Three pieces, parallel to the HF ones: :func:`omit_layer` (sliced forward + recording of one
layer), :func:`omitted_slices` (which rows / columns of which Megatron parameter a selection
omits) and :func:`unit_shape` (query heads, KV heads, head_dim, MLP channels). Weight slices are
taken through ``take(param, dim, index)``, one call per weight and forward: :func:`omit` passes the
step's :class:`~ds_accel.sat.omit.StepSlices`, so the slices are gathered once per optimizer step
as on HF models. ``ds_accel.sat.omit`` delegates a Megatron model to :func:`omit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor, nn

from ..sat.omit import HeadSelection, StepSlices, attend, to_device
from ..sat.optim_guard import OmittedSlice
from ..structure import KeepDict, TensorShard, UnitShape, head_rows, in_block, unique_indices
from .layout import qkv_k_rows, qkv_q_rows, qkv_v_rows
from .params import unwrap_gpt

if TYPE_CHECKING:
    from ..sat.importance import ImportanceTracker

Take = Callable[[Tensor, int, Tensor], Tensor]  # take(param, dim, index) -> the kept slice of the weight


def _index_select(param: Tensor, dim: int, index: Tensor) -> Tensor:
    return param.index_select(dim, index)


def is_megatron(model_or_layers: Any) -> bool:
    """True for a GPTModel (or a wrapper / engine around one) or a collection of Megatron TransformerLayers."""
    if isinstance(model_or_layers, dict):
        model_or_layers = list(model_or_layers.values())
    if isinstance(model_or_layers, (list, tuple, nn.ModuleList)):
        return bool(model_or_layers) and isinstance(model_or_layers[0], TransformerLayer)
    try:
        unwrap_gpt(model_or_layers)
    except TypeError:
        return False
    return True


def decoder_layers(model_or_layers: Any) -> dict[int, TransformerLayer]:
    """The TransformerLayers by layer index (0-based; Megatron's ``layer_number`` is 1-based)."""
    if isinstance(model_or_layers, dict):
        return dict(model_or_layers)
    if isinstance(model_or_layers, (list, tuple, nn.ModuleList)):
        return dict(enumerate(model_or_layers))
    return dict(enumerate(unwrap_gpt(model_or_layers).decoder.layers))


def unit_shape(layer: nn.Module) -> UnitShape:
    """Query heads, KV heads, head_dim and MLP channels of the whole layer (not of one TP rank's block);
    any Megatron module of the layer (its ``config``) will do."""
    c = layer.config
    return UnitShape(c.num_attention_heads, c.num_query_groups or c.num_attention_heads, c.kv_channels,
                 c.ffn_hidden_size)


def tensor_shard(layer: TransformerLayer) -> TensorShard | None:
    """This rank's block of heads and channels under Megatron TP (None at tp=1) and the TP collectives."""
    group = layer.self_attention.linear_qkv.tp_group
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if tp == 1:
        return None
    shape = unit_shape(layer)
    heads, channels = shape.heads // tp, shape.channels // tp
    return TensorShard(heads=range(rank * heads, (rank + 1) * heads),
                       channels=range(rank * channels, (rank + 1) * channels),
                       enter=partial(copy_to_tensor_model_parallel_region, group=group),
                       reduce=partial(reduce_from_tensor_model_parallel_region, group=group))


def _local_heads(layer: TransformerLayer, kept: Tensor, shard: TensorShard | None) -> HeadSelection:
    """This rank's kept query heads (local indices) and the local KV heads they use."""
    shape = unit_shape(layer)
    q_heads = unique_indices(kept.cpu(), shape.heads, "heads")
    if shard is not None:
        q_heads = in_block(q_heads, shard.heads)
    return HeadSelection.from_heads(q_heads, shape.groups, shape.head_dim)


def _local_channels(layer: TransformerLayer, kept: Tensor, shard: TensorShard | None) -> Tensor:
    channels = unique_indices(kept.cpu(), unit_shape(layer).channels, "channels")
    return channels if shard is None else in_block(channels, shard.channels)


def _output(linear: nn.Module, a: Tensor, weight: Tensor | None, shard: TensorShard | None) -> tuple[Tensor, Any]:
    """(a W[:, kept]^T summed over the TP group, bias): a RowParallelLinear on some input columns. The bias
    is returned apart, as Megatron's linear_proj / linear_fc2 do (``skip_bias_add``). ``weight`` None:
    this rank keeps none of its units and contributes ``0 * a`` (``a`` is the layer input)."""
    part = a * 0 if weight is None else F.linear(a, weight)
    return (part if shard is None else shard.reduce(part)), linear.bias


@dataclass(frozen=True)
class _HeadIndex:
    """One layer's kept heads on this rank, as device indices made once per context: the linear_qkv rows
    (the kept query heads', then their KV heads' keys, then values), the widths of those three parts,
    each kept query head's position among the kept KV heads (None without GQA), linear_proj's columns,
    and whether the kept KV heads serve equally many kept query heads (``HeadSelection.even_groups``)."""

    qkv_rows: Tensor
    widths: tuple[int, int, int]
    q_to_kv: Tensor | None
    proj_columns: Tensor
    even_groups: bool


@dataclass(frozen=True)
class _ChannelIndex:
    """One layer's kept channels on this rank: linear_fc1 rows (gate rows, then up rows), linear_fc2 columns."""

    fc1_rows: Tensor
    fc2_columns: Tensor


def _sliced_attention(attn: nn.Module, index: _HeadIndex | None, shard: TensorShard | None,
                      record: Callable[..., None] | None, take: Take, hidden_states: Tensor,
                      attention_mask: Tensor | None = None, key_value_states: Tensor | None = None,
                      inference_context: Any = None, rotary_pos_emb: Any = None, packed_seq_params: Any = None,
                      **unused: Any) -> tuple[Tensor, Any]:
    """SelfAttention.forward on the kept heads; [seq, batch, hidden] in, (output, bias) out."""
    if inference_context is not None or packed_seq_params is not None or key_value_states is not None:
        raise ValueError("omit(): SAT slices training forwards (no inference context, packed sequences or "
                         "cross attention)")
    x = hidden_states if shard is None else shard.enter(hidden_states)
    if index is None:
        return _output(attn.linear_proj, x, None, shard)
    head_dim = unit_shape(attn).head_dim
    q, k, v = F.linear(x, take(attn.linear_qkv.weight, 0, index.qkv_rows)).split(index.widths, dim=-1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))  # [seq, batch, heads, head_dim]
    if rotary_pos_emb is not None:
        q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        cp = attn.pg_collection.cp
        q = apply_rotary_pos_emb(q, q_emb, config=attn.config, cp_group=cp)
        k = apply_rotary_pos_emb(k, k_emb, config=attn.config, cp_group=cp)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    out = attend(
        q, k, v, index.q_to_kv, index.even_groups, None if attention_mask is None else ~attention_mask,
        dropout_p=attn.config.attention_dropout if attn.training else 0.0,
        is_causal=attention_mask is None and q.shape[2] > 1, scale=attn.core_attention.softmax_scale)
    out = out.permute(2, 0, 1, 3).flatten(-2)  # [seq, batch, kept heads * head_dim]
    weight = take(attn.linear_proj.weight, 1, index.proj_columns)
    if record is not None:
        record(out, weight=weight.detach())
    return _output(attn.linear_proj, out, weight, shard)


def _sliced_mlp(mlp: nn.Module, index: _ChannelIndex | None, shard: TensorShard | None,
                record: Callable[..., None] | None, take: Take, hidden_states: Tensor,
                **unused: Any) -> tuple[Tensor, Any]:
    """MLP.forward (SwiGLU) on the kept channels; (output, bias) out."""
    x = hidden_states if shard is None else shard.enter(hidden_states)
    if index is None:
        return _output(mlp.linear_fc2, x, None, shard)
    gate, up = F.linear(x, take(mlp.linear_fc1.weight, 0, index.fc1_rows)).chunk(2, dim=-1)
    a = F.silu(gate) * up
    weight = take(mlp.linear_fc2.weight, 1, index.fc2_columns)
    if record is not None:
        record(a, weight=weight.detach())
    return _output(mlp.linear_fc2, a, weight, shard)


def _swap_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Shadow ``module.forward`` by an instance attribute; returns the undo."""
    module.forward = forward
    return partial(module.__dict__.pop, "forward")


def _observe_dense(linear: nn.Module, record: Callable[..., None], block: range | None) -> Callable[[], None]:
    """Record the dense input of linear_proj / linear_fc2 (all units, or this rank's block under TP)."""
    kept = None if block is None else torch.arange(block.start, block.stop, device=linear.weight.device)
    return linear.register_forward_pre_hook(
        lambda mod, args: record(args[0], kept=kept, weight=mod.weight.detach())).remove


def _head_index(layer: TransformerLayer, kept: Tensor, shard: TensorShard | None) -> tuple[_HeadIndex, Tensor] | None:
    """The device indices of this rank's kept heads and their global numbers (for recording); None: it keeps none."""
    shape, heads = unit_shape(layer), _local_heads(layer, kept, shard)
    if not len(heads.q_heads):
        return None
    rows = [qkv_q_rows(heads.q_heads, shape), qkv_k_rows(heads.kv_heads, shape), qkv_v_rows(heads.kv_heads, shape)]
    host = [torch.cat(rows), head_rows(heads.q_heads, shape.head_dim),
            heads.q_heads + (0 if shard is None else shard.heads.start)]
    host += [] if heads.q_to_kv is None else [heads.q_to_kv]
    dev = to_device(host, layer.self_attention.linear_qkv.weight.device)
    widths = (len(rows[0]), len(rows[1]), len(rows[2]))
    return _HeadIndex(dev[0], widths, dev[3] if len(dev) > 3 else None, dev[1], heads.even_groups), dev[2]


def _channel_index(layer: TransformerLayer, kept: Tensor, shard: TensorShard | None
                   ) -> tuple[_ChannelIndex, Tensor] | None:
    """The device indices of this rank's kept channels and their global numbers; None: it keeps none."""
    channels = _local_channels(layer, kept, shard)
    if not len(channels):
        return None
    local = layer.mlp.linear_fc1.weight.shape[0] // 2  # [gate_r; up_r]
    host = [torch.cat([channels, local + channels]), channels,
            channels + (0 if shard is None else shard.channels.start)]
    fc1_rows, fc2_columns, kept_global = to_device(host, layer.mlp.linear_fc2.weight.device)
    return _ChannelIndex(fc1_rows, fc2_columns), kept_global


@dataclass(frozen=True)
class _Half:
    """One sliced half of a layer on this rank: its device indices (None: this rank keeps none of the
    layer's kept units) and this rank's kept units as global numbers, for recording."""

    index: _HeadIndex | _ChannelIndex | None
    kept: Tensor | None


LayerIndex = tuple[_Half | None, _Half | None]  # (attention, MLP); None: that half runs dense


def _resolve_layer(layer: TransformerLayer, kept_heads: Tensor | None, kept_channels: Tensor | None,
                   shard: TensorShard | None) -> LayerIndex:
    shape = unit_shape(layer)
    heads = channels = None

    def omits(kept: Tensor | None, n: int, what: str) -> bool:
        return kept is not None and len(unique_indices(kept.cpu(), n, what)) < n

    if omits(kept_heads, shape.heads, "heads"):
        found = _head_index(layer, kept_heads, shard)
        heads = _Half(None, None) if found is None else _Half(*found)
    if omits(kept_channels, shape.channels, "channels"):
        found = _channel_index(layer, kept_channels, shard)
        channels = _Half(None, None) if found is None else _Half(*found)
    return heads, channels


def resolve(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
            shard: TensorShard | None = None) -> dict[int, LayerIndex]:
    """Every layer's selection on this rank as device indices (``ds_accel.sat.omit.resolve`` for Megatron):
    made once per selection, since the controller's ``ResolveCache`` hands the same one back while the
    kept units stay, so a step's :func:`omit` neither reads indices on the host nor copies them."""
    layers = decoder_layers(model_or_layers)
    unknown = (set(keep_heads) | set(keep_channels)) - set(layers)
    if unknown:
        raise ValueError(f"omit(): no decoder layer with index {sorted(unknown)}")
    shard = tensor_shard(next(iter(layers.values()))) if shard is None else shard
    return {index: _resolve_layer(layer, keep_heads.get(index), keep_channels.get(index), shard)
            for index, layer in layers.items()}


def omit_layer(layer: TransformerLayer, kept_heads: Tensor | None, kept_channels: Tensor | None,
               shard: TensorShard | None = None, record_heads: Callable[..., None] | None = None,
               record_channels: Callable[..., None] | None = None, take: Take = _index_select,
               resolved: LayerIndex | None = None) -> list[Callable[[], None]]:
    """Install the sliced forward (or, when recording, the dense observers) on one layer; returns the undos.

    ``kept_heads`` / ``kept_channels``: global indices, None (or all units) for a dense half, which
    keeps Megatron's own forward. ``record_*``: ``record(activation, kept=None, weight=None)``. The
    indices go to the device here, once, so the forward and backward never wait on the host;
    ``resolved``: this layer's entry of :func:`resolve` for the same selection (then nothing is copied).
    """
    heads, channels = _resolve_layer(layer, kept_heads, kept_channels, shard) if resolved is None else resolved
    undo: list[Callable[[], None]] = []
    attn, mlp = layer.self_attention, layer.mlp
    if heads is not None:
        if record_heads is not None and heads.kept is not None:
            record_heads = partial(record_heads, kept=heads.kept)
        undo.append(_swap_forward(attn, partial(_sliced_attention, attn, heads.index, shard, record_heads, take)))
    elif record_heads is not None:
        undo.append(_observe_dense(attn.linear_proj, record_heads, None if shard is None else shard.heads))
    if channels is not None:
        if record_channels is not None and channels.kept is not None:
            record_channels = partial(record_channels, kept=channels.kept)
        undo.append(_swap_forward(mlp, partial(_sliced_mlp, mlp, channels.index, shard, record_channels, take)))
    elif record_channels is not None:
        undo.append(_observe_dense(mlp.linear_fc2, record_channels, None if shard is None else shard.channels))
    return undo


@contextmanager
def omit(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
         tracker: ImportanceTracker | None = None, shard: TensorShard | None = None,
         micro_batches: int = 1, keep_slices: bool = True,
         selection: dict[int, LayerIndex] | None = None) -> Iterator[StepSlices]:
    """``ds_accel.sat.omit`` for a Megatron GPTModel (or its layers), which delegates here: forward and
    backward inside the context compute only the kept heads and channels, with a ``tracker`` every layer
    records importance, and one context is one optimizer step of ``micro_batches`` passes sharing the
    weight slices (:class:`~ds_accel.sat.omit.StepSlices`, yielded). ``shard``: default
    :func:`tensor_shard` of the first layer (Megatron TP is read off the model). ``selection``: the
    same dicts already resolved by :func:`resolve`."""
    layers = decoder_layers(model_or_layers)
    shard = tensor_shard(next(iter(layers.values()))) if shard is None else shard
    selection = resolve(layers, keep_heads, keep_channels, shard) if selection is None else selection
    slices = StepSlices(micro_batches, keep_slices)
    with ExitStack() as stack:
        for index, layer in layers.items():
            record = {} if tracker is None else {"record_heads": partial(tracker.record_heads, index),
                                                 "record_channels": partial(tracker.record_channels, index)}
            for undo in omit_layer(layer, keep_heads.get(index), keep_channels.get(index), shard, take=slices,
                                   resolved=selection[index], **record):
                stack.callback(undo)
        yield slices
    slices.check_complete()


def _complement(kept: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def omitted_slices(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
                   shard: TensorShard | None = None) -> list[OmittedSlice]:
    """The rows / columns of this rank's Megatron parameters that a selection omits (host indices, sorted).

    Heads: rows of ``linear_qkv`` holding the omitted query heads and the KV heads (k and v rows) no
    kept query head uses, columns of ``linear_proj`` of the omitted query heads. Channels: gate and up
    rows of ``linear_fc1``, columns of ``linear_fc2``. Biases (none in a Llama) take part always.
    """
    layers = decoder_layers(model_or_layers)
    shard = tensor_shard(next(iter(layers.values()))) if shard is None else shard
    out: list[OmittedSlice] = []
    for index, layer in layers.items():
        shape = unit_shape(layer)
        tp = 1 if shard is None else shape.heads // len(shard.heads)
        parts: list[tuple[str, int, Tensor]] = []
        if index in keep_heads:
            heads = _local_heads(layer, keep_heads[index], shard)
            q = _complement(heads.q_heads, shape.heads // tp)
            kv = _complement(heads.kv_heads, shape.kv_heads // tp)
            rows = torch.cat([qkv_q_rows(q, shape), qkv_k_rows(kv, shape), qkv_v_rows(kv, shape)]).sort().values
            parts += [("self_attention.linear_qkv.weight", 0, rows),
                      ("self_attention.linear_proj.weight", 1, head_rows(q, shape.head_dim))]
        if index in keep_channels:
            local = shape.channels // tp
            omitted = _complement(_local_channels(layer, keep_channels[index], shard), local)
            parts += [("mlp.linear_fc1.weight", 0, torch.cat([omitted, local + omitted])),
                      ("mlp.linear_fc2.weight", 1, omitted)]
        out += [OmittedSlice(index, name, layer.get_parameter(name), dim, rows)
                for name, dim, rows in parts if rows.numel()]
    return out


__all__ = ["decoder_layers", "is_megatron", "omit", "omit_layer", "omitted_slices", "resolve", "tensor_shard",
           "unit_shape"]

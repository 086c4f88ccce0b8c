"""Omission: the sliced forward of Sparsity-Accelerated Training (Ma et al., 2024).

Under :func:`omit`, each decoder layer with a selection computes only its kept units, as dense GEMMs of
a smaller size (no sparse kernels, no multiplication by zero masks):

* attention: q rows of the kept query heads, k/v rows of the KV heads they use (GQA: the union of their
  groups), RoPE and scaled-dot-product attention on those heads, o_proj on the matching input columns;
* MLP: a = act(x W_gate[C]^T) * (x W_up[C]^T), out = a W_down[:, C]^T for the kept channels C.

Autograd runs through the same index_select'ed weights, so the backward is sliced too and omitted rows
and columns get exactly zero gradient. Kept units are not rescaled (unlike dropout): the kept network
is a structured subnetwork of the full one, and LORS ends training dense.

Tensor parallelism (Megatron-style, as DeepSpeed AutoTP splits a Llama): a :class:`TensorShard` says which
query heads and MLP channels this rank holds. The selection stays global (the same on every rank);
each rank computes the kept units of its own block with its local rows of q/k/v/gate/up and columns of
o/down, and the partial outputs are summed over the TP group before the bias is added once.

The layer's ``self_attn`` / ``mlp`` get an instance attribute ``forward`` (bound to the sliced function)
for the duration of the context; a layer or module without an omission keeps HF's own forward, so a
step at omission rate 0 is bit-for-bit the dense step. Importance is recorded in the same forward:
from the sliced activations, or on dense modules by a forward pre-hook on o_proj / down_proj that
only reads their input.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ds_accel.structure import KeepDict, TensorShard, decoder_layers, head_rows, in_block, unique_indices

if TYPE_CHECKING:
    from ds_accel.sat.importance import ImportanceTracker

# record(activation, kept=None, weight=None): a layer's ImportanceTracker.record_heads/_channels; ``weight``: the
# output projection's (o_proj / down_proj) columns of the recorded units, for weight-aware metrics
Recorder = Callable[..., None]


@dataclass(frozen=True)
class HeadSelection:
    """Kept query heads of one attention module and what follows from them under GQA.

    ``kv_heads`` is the union of the kept query heads' KV heads (query head h uses KV head
    h // (num_heads / num_kv_heads)); ``q_to_kv[i]`` is the position of kept query head i's KV head
    within ``kv_heads`` (None without GQA, where the two lists coincide).
    """

    q_heads: Tensor
    kv_heads: Tensor
    q_rows: Tensor
    kv_rows: Tensor
    q_to_kv: Tensor | None

    @classmethod
    def of(cls, attn: nn.Module, kept: Tensor) -> HeadSelection:
        config, device = attn.config, attn.q_proj.weight.device
        q_heads = unique_indices(kept, config.num_attention_heads, f"layer {attn.layer_idx} heads").to(device)
        return cls.from_heads(q_heads, config.num_attention_heads // config.num_key_value_heads, attn.head_dim)

    @classmethod
    def from_heads(cls, q_heads: Tensor, groups: int, head_dim: int) -> HeadSelection:
        """From sorted unique query-head indices, ``groups`` query heads per KV head (1: no GQA)."""
        kv_of_q = q_heads // groups
        kv_heads = torch.unique(kv_of_q)
        q_to_kv = torch.searchsorted(kv_heads, kv_of_q) if groups > 1 else None
        rows = partial(head_rows, head_dim=head_dim)
        return cls(q_heads, kv_heads, rows(q_heads), rows(kv_heads), q_to_kv)


def _project(x: Tensor, linear: nn.Linear, rows: Tensor) -> Tensor:
    """x W[rows]^T + b[rows]: the linear layer restricted to some output features."""
    bias = None if linear.bias is None else linear.bias.index_select(0, rows)
    return F.linear(x, linear.weight.index_select(0, rows), bias)


def _output(linear: nn.Module, a: Tensor, columns: Tensor | None, shard: TensorShard | None) -> Tensor:
    """a W[:, columns]^T + b: the output projection (o_proj, down_proj) on some of its input features.

    Under tensor parallelism the ranks' partial products are summed and the replicated bias is added
    once, after the sum. ``columns`` None: this rank keeps none of its features and contributes
    ``0 * a`` (``a`` is then the layer input, of the output's width), which keeps the rank in both
    collectives of the forward and of the backward.
    """
    if shard is None:
        return F.linear(a, linear.weight.index_select(1, columns), linear.bias)
    part = a * 0 if columns is None else F.linear(a, linear.weight.index_select(1, columns))
    out = shard.reduce(part)
    return out if linear.bias is None else out + linear.bias


def _sliced_attention(attn: nn.Module, heads: HeadSelection | None, shard: TensorShard | None,
                      record: Recorder | None, hidden_states: Tensor,
                      position_embeddings: tuple[Tensor, Tensor] | None = None,
                      attention_mask: Tensor | None = None, cache: Any = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """LlamaAttention.forward on the kept heads only; same signature and (output, None) return.

    ``heads`` index this rank's own rows (all of them without tensor parallelism); None: it keeps none.
    """
    if cache is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("omit(): a KV cache cannot hold omitted heads; call the model with use_cache=False")
    x = hidden_states if shard is None else shard.enter(hidden_states)
    if heads is None:
        return _output(attn.o_proj, x, None, shard), None
    head_shape = (-1, attn.head_dim)
    q = _project(x, attn.q_proj, heads.q_rows).unflatten(-1, head_shape).transpose(1, 2)
    k = _project(x, attn.k_proj, heads.kv_rows).unflatten(-1, head_shape).transpose(1, 2)
    v = _project(x, attn.v_proj, heads.kv_rows).unflatten(-1, head_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if heads.q_to_kv is not None:
        k, v = k.index_select(1, heads.q_to_kv), v.index_select(1, heads.q_to_kv)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=attn.attention_dropout if attn.training else 0.0,
        is_causal=attention_mask is None and q.shape[2] > 1, scale=attn.scaling)
    out = out.transpose(1, 2).flatten(-2)
    if record is not None:
        record(out, weight=attn.o_proj.weight.index_select(1, heads.q_rows).detach())
    return _output(attn.o_proj, out, heads.q_rows, shard), None


def _sliced_mlp(mlp: nn.Module, channels: Tensor | None, shard: TensorShard | None, record: Recorder | None,
                x: Tensor) -> Tensor:
    """LlamaMLP.forward on the kept channels only (this rank's local indices; None: it keeps none)."""
    x = x if shard is None else shard.enter(x)
    if channels is None:
        return _output(mlp.down_proj, x, None, shard)
    a = mlp.act_fn(_project(x, mlp.gate_proj, channels)) * _project(x, mlp.up_proj, channels)
    if record is not None:
        record(a, weight=mlp.down_proj.weight.index_select(1, channels).detach())
    return _output(mlp.down_proj, a, channels, shard)


def _swap_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Shadow ``module.forward`` by an instance attribute; returns the undo."""
    missing = object()
    previous = module.__dict__.get("forward", missing)
    module.forward = forward

    def undo() -> None:
        if previous is missing:
            del module.forward
        else:
            module.forward = previous

    return undo


def _observe_input(module: nn.Module, record: Recorder) -> Callable[[], None]:
    """Forward pre-hook passing the module's input to ``record``; returns the undo."""
    return module.register_forward_pre_hook(lambda mod, args: record(args[0], weight=mod.weight.detach())).remove


def _observe_dense(linear: nn.Module, record: Recorder | None, block: range | None) -> Callable[[], None] | None:
    """When recording, observe the dense input of the output projection: all units, or this rank's block."""
    if record is None:
        return None
    if block is not None:
        record = partial(record, kept=torch.arange(block.start, block.stop, device=linear.weight.device))
    return _observe_input(linear, record)


def _omit_attention(attn: nn.Module, kept: Tensor | None, record: Recorder | None,
                    shard: TensorShard | None) -> Callable[[], None] | None:
    """Sliced forward if some heads are omitted; else, when recording, observe the dense o_proj input."""
    heads = None if kept is None else HeadSelection.of(attn, kept)
    if heads is None or heads.q_heads.numel() == attn.config.num_attention_heads:
        return _observe_dense(attn.o_proj, record, None if shard is None else shard.heads)
    if shard is not None:
        local = in_block(heads.q_heads, shard.heads)
        groups = attn.config.num_attention_heads // attn.config.num_key_value_heads
        heads = HeadSelection.from_heads(local, groups, attn.head_dim) if local.numel() else None
    if record is not None and heads is not None:
        record = partial(record, kept=heads.q_heads if shard is None else heads.q_heads + shard.heads.start)
    return _swap_forward(attn, partial(_sliced_attention, attn, heads, shard, record))


def _omit_mlp(mlp: nn.Module, kept: Tensor | None, record: Recorder | None,
              shard: TensorShard | None) -> Callable[[], None] | None:
    """Sliced forward if some channels are omitted; else, when recording, observe the dense down_proj input."""
    n = mlp.intermediate_size
    channels = None if kept is None else unique_indices(kept, n, "channels").to(mlp.down_proj.weight.device)
    if channels is None or channels.numel() == n:
        return _observe_dense(mlp.down_proj, record, None if shard is None else shard.channels)
    if shard is not None:
        local = in_block(channels, shard.channels)
        channels = local if local.numel() else None
    if record is not None and channels is not None:
        record = partial(record, kept=channels if shard is None else channels + shard.channels.start)
    return _swap_forward(mlp, partial(_sliced_mlp, mlp, channels, shard, record))


@contextmanager
def omit(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
         tracker: ImportanceTracker | None = None, shard: TensorShard | None = None) -> Iterator[None]:
    """Within the context, forward and backward compute only the kept heads and MLP channels.

    ``keep_heads`` / ``keep_channels``: {layer index: kept query-head / channel indices}; a layer missing
    from a dict, or keeping all its units, stays dense (HF's forward, untouched). With a ``tracker``,
    every layer records importance in the same forward: ``omit(model, {}, {}, tracker)`` is the dense
    recording step for omission rate 0. Run the backward inside the context when gradient checkpointing
    recomputes layers. Leaving the context removes every swapped forward and hook.

    ``shard``: under tensor parallelism, this rank's block; the dicts still hold global indices (the
    same on every rank) and the tracker records each unit on the rank that holds it.
    """
    layers = decoder_layers(model_or_layers)
    unknown = (set(keep_heads) | set(keep_channels)) - set(layers)
    if unknown:
        raise ValueError(f"omit(): no decoder layer with index {sorted(unknown)}")
    undo: list[Callable[[], None] | None] = []
    try:
        for index, layer in layers.items():
            record_heads = None if tracker is None else partial(tracker.record_heads, index)
            record_channels = None if tracker is None else partial(tracker.record_channels, index)
            undo.append(_omit_attention(layer.self_attn, keep_heads.get(index), record_heads, shard))
            undo.append(_omit_mlp(layer.mlp, keep_channels.get(index), record_channels, shard))
        yield
    finally:
        for step in reversed(undo):
            if step is not None:
                step()


def kept_fraction(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict) -> dict[str, float]:
    """Fraction of query heads, KV heads and MLP channels computed under a selection, over all layers."""
    names = ("heads", "kv_heads", "channels")
    kept, total = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for index, layer in decoder_layers(model_or_layers).items():
        config, n_channels = layer.self_attn.config, layer.mlp.intermediate_size
        heads = HeadSelection.of(layer.self_attn, keep_heads.get(index, torch.arange(config.num_attention_heads)))
        channels = unique_indices(keep_channels.get(index, torch.arange(n_channels)), n_channels, "channels")
        for key, k, n in (("heads", len(heads.q_heads), config.num_attention_heads),
                          ("kv_heads", len(heads.kv_heads), config.num_key_value_heads),
                          ("channels", len(channels), n_channels)):
            kept[key] += k
            total[key] += n
    return {key: kept[key] / total[key] for key in kept}


__all__ = ["HeadSelection", "kept_fraction", "omit"]

"""Omission: the sliced forward of Sparsity-Accelerated Training (Ma et al., 2024).

Under :func:`omit`, each decoder layer with a selection computes only its kept units, as dense GEMMs of
a smaller size (no sparse kernels, no multiplication by zero masks):

* attention: q rows of the kept query heads, k/v rows of the KV heads they use (GQA: the union of their
  groups), RoPE and scaled-dot-product attention on those heads, o_proj on the matching input columns;
* MLP: a = act(x W_gate[C]^T) * (x W_up[C]^T), out = a W_down[:, C]^T for the kept channels C.

Autograd runs through the same index_select'ed weights, so the backward is sliced too and omitted rows
and columns get exactly zero gradient. Kept units are not rescaled (unlike dropout): the kept network
is a structured subnetwork of the full one, and LORS ends training dense.

The layer's ``self_attn`` / ``mlp`` get an instance attribute ``forward`` (bound to the sliced function)
for the duration of the context; a layer or module without an omission keeps HF's own forward, so a
step at omission rate 0 is bit-for-bit the dense step. Importance is recorded in the same forward:
from the sliced activations, or on dense modules by a forward pre-hook on o_proj / down_proj that
only reads their input.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

if TYPE_CHECKING:
    from ds_accel.sat.importance import ImportanceTracker

KeepDict = Mapping[int, Tensor]
Recorder = Callable[..., None]  # record(activation, kept=None): a layer's ImportanceTracker.record_heads/_channels


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
        groups = config.num_attention_heads // config.num_key_value_heads
        kv_of_q = q_heads // groups
        kv_heads = torch.unique(kv_of_q)
        q_to_kv = torch.searchsorted(kv_heads, kv_of_q) if groups > 1 else None
        rows = partial(head_rows, head_dim=attn.head_dim)
        return cls(q_heads, kv_heads, rows(q_heads), rows(kv_heads), q_to_kv)


def _project(x: Tensor, linear: nn.Linear, rows: Tensor) -> Tensor:
    """x W[rows]^T + b[rows]: the linear layer restricted to some output features."""
    bias = None if linear.bias is None else linear.bias.index_select(0, rows)
    return F.linear(x, linear.weight.index_select(0, rows), bias)


def _sliced_attention(attn: nn.Module, heads: HeadSelection, record: Recorder | None,
                      hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                      attention_mask: Tensor | None = None, cache: Any = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """LlamaAttention.forward on the kept heads only; same signature and (output, None) return."""
    if cache is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("omit(): a KV cache cannot hold omitted heads; call the model with use_cache=False")
    head_shape = (-1, attn.head_dim)
    q = _project(hidden_states, attn.q_proj, heads.q_rows).unflatten(-1, head_shape).transpose(1, 2)
    k = _project(hidden_states, attn.k_proj, heads.kv_rows).unflatten(-1, head_shape).transpose(1, 2)
    v = _project(hidden_states, attn.v_proj, heads.kv_rows).unflatten(-1, head_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if heads.q_to_kv is not None:
        k, v = k.index_select(1, heads.q_to_kv), v.index_select(1, heads.q_to_kv)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=attn.attention_dropout if attn.training else 0.0,
        is_causal=attention_mask is None and q.shape[2] > 1, scale=attn.scaling)
    out = out.transpose(1, 2).flatten(-2)
    if record is not None:
        record(out)
    return F.linear(out, attn.o_proj.weight.index_select(1, heads.q_rows), attn.o_proj.bias), None


def _sliced_mlp(mlp: nn.Module, channels: Tensor, record: Recorder | None, x: Tensor) -> Tensor:
    """LlamaMLP.forward on the kept channels only."""
    a = mlp.act_fn(_project(x, mlp.gate_proj, channels)) * _project(x, mlp.up_proj, channels)
    if record is not None:
        record(a)
    return F.linear(a, mlp.down_proj.weight.index_select(1, channels), mlp.down_proj.bias)


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
    return module.register_forward_pre_hook(lambda _, args: record(args[0])).remove


def _omit_attention(attn: nn.Module, kept: Tensor | None, record: Recorder | None) -> Callable[[], None] | None:
    """Sliced forward if some heads are omitted; else, when recording, observe the dense o_proj input."""
    heads = None if kept is None else HeadSelection.of(attn, kept)
    if heads is not None and heads.q_heads.numel() < attn.config.num_attention_heads:
        record = None if record is None else partial(record, kept=heads.q_heads)
        return _swap_forward(attn, partial(_sliced_attention, attn, heads, record))
    return None if record is None else _observe_input(attn.o_proj, record)


def _omit_mlp(mlp: nn.Module, kept: Tensor | None, record: Recorder | None) -> Callable[[], None] | None:
    """Sliced forward if some channels are omitted; else, when recording, observe the dense down_proj input."""
    n = mlp.down_proj.in_features
    channels = None if kept is None else unique_indices(kept, n, "channels").to(mlp.down_proj.weight.device)
    if channels is not None and channels.numel() < n:
        record = None if record is None else partial(record, kept=channels)
        return _swap_forward(mlp, partial(_sliced_mlp, mlp, channels, record))
    return None if record is None else _observe_input(mlp.down_proj, record)


@contextmanager
def omit(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
         tracker: ImportanceTracker | None = None) -> Iterator[None]:
    """Within the context, forward and backward compute only the kept heads and MLP channels.

    ``keep_heads`` / ``keep_channels``: {layer index: kept query-head / channel indices}; a layer missing
    from a dict, or keeping all its units, stays dense (HF's forward, untouched). With a ``tracker``,
    every layer records importance in the same forward: ``omit(model, {}, {}, tracker)`` is the dense
    recording step for omission rate 0. Run the backward inside the context when gradient checkpointing
    recomputes layers. Leaving the context removes every swapped forward and hook.
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
            undo.append(_omit_attention(layer.self_attn, keep_heads.get(index), record_heads))
            undo.append(_omit_mlp(layer.mlp, keep_channels.get(index), record_channels))
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
        config, n_channels = layer.self_attn.config, layer.mlp.down_proj.in_features
        heads = HeadSelection.of(layer.self_attn, keep_heads.get(index, torch.arange(config.num_attention_heads)))
        channels = unique_indices(keep_channels.get(index, torch.arange(n_channels)), n_channels, "channels")
        for key, k, n in (("heads", len(heads.q_heads), config.num_attention_heads),
                          ("kv_heads", len(heads.kv_heads), config.num_key_value_heads),
                          ("channels", len(channels), n_channels)):
            kept[key] += k
            total[key] += n
    return {key: kept[key] / total[key] for key in kept}


__all__ = ["HeadSelection", "decoder_layers", "head_rows", "kept_fraction", "omit", "unique_indices"]

"""Omission: the sliced forward of Sparsity-Accelerated Training (Ma et al., 2024).

Under :func:`omit`, each decoder layer with a selection computes only its kept units, as dense GEMMs of
a smaller size (no sparse kernels, no multiplication by zero masks):

* attention: q rows of the kept query heads, k/v rows of the KV heads they use (GQA: the union of their
  groups), RoPE and scaled-dot-product attention on those heads, o_proj on the matching input columns;
* MLP: a = act(x W_gate[C]^T) * (x W_up[C]^T), out = a W_down[:, C]^T for the kept channels C.

Slicing once per optimizer step: the weights do not change between the micro-batches of one step, so
the kept rows / columns of every weight are gathered once (at their first use inside the context) and
reused by every micro-batch and by activation-checkpoint recomputations. Their gradients accumulate in
the slice, and the full-size gradient (zeros on the omitted rows / columns) goes to the weight once, in
the backward of the last micro-batch (``micro_batches``), as in a dense step with local accumulation.
An engine that takes every parameter's gradient in a hook at each backward (ZeRO-2, ``overlap_comm``)
gets it at each micro-batch instead (``micro_batches=1``; the slices are still gathered once). Omitted
rows and columns get exactly zero gradient. When each weight is used once in the step (one micro-batch,
no gradient checkpointing: ``forwards`` is 1), the slices are plain ``index_select`` calls: autograd's own
backward writes the same full-size gradient, without a Python function per weight in the forward and the
backward (3% of the ``small`` preset's step on a 2-core CPU). ``keep_slices=False`` gathers at every
use instead (ZeRO-3: the slices of all layers held over a step would be (1 - r) of the whole model on
every rank, undoing the partitioning).

Kept units are not rescaled (unlike dropout): the kept network is a structured subnetwork of the full
one, and LORS ends training dense.

Tensor parallelism (Megatron-style, as DeepSpeed AutoTP splits a Llama): a :class:`TensorShard` says which
query heads and MLP channels this rank holds. The selection stays global (the same on every rank);
each rank computes the kept units of its own block with its local rows of q/k/v/gate/up and columns of
o/down, and the partial outputs are summed over the TP group before the bias is added once.

The layer's ``self_attn`` / ``mlp`` get an instance attribute ``forward`` (bound to the sliced function)
for the duration of the context; a layer or module without an omission keeps HF's own forward, so a
step at omission rate 0 is bit-for-bit the dense step. Importance is recorded in the same forward:
from the sliced activations, or on dense modules by a forward pre-hook on o_proj / down_proj that
only reads their input.

Selections are resolved on the host once per context (:func:`resolve`) and their index tensors go to
the device in one copy, so the forward and backward of a step never wait on the host.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ds_accel.structure import KeepDict, TensorShard, decoder_layers, head_rows, in_block, unique_indices

if TYPE_CHECKING:
    from ds_accel.sat.importance import ImportanceTracker

# record(activation, kept=None, weight=None): a layer's ImportanceTracker.record_heads/_channels; ``weight``: the
# output projection's (o_proj / down_proj) columns of the recorded units, for weight-aware metrics
Recorder = Callable[..., None]


@dataclass(frozen=True)
class HeadSelection:
    """Kept query heads of one attention module and what follows from them under GQA (host tensors).

    ``kv_heads`` is the union of the kept query heads' KV heads (query head h uses KV head
    h // (num_heads / num_kv_heads)); ``q_to_kv[i]`` is the position of kept query head i's KV head
    within ``kv_heads`` (None without GQA, where the two lists coincide). ``even_groups``: every kept KV
    head serves as many kept query heads (always so for ``kv_group`` granularity), so attention can
    take the kept KV heads as they are (:func:`attend`).
    """

    q_heads: Tensor
    kv_heads: Tensor
    q_rows: Tensor
    kv_rows: Tensor
    q_to_kv: Tensor | None
    even_groups: bool = False

    @classmethod
    def of(cls, attn: nn.Module, kept: Tensor) -> HeadSelection:
        config = attn.config
        q_heads = unique_indices(kept, config.num_attention_heads, f"layer {attn.layer_idx} heads")
        return cls.from_heads(q_heads, config.num_attention_heads // config.num_key_value_heads, attn.head_dim)

    @classmethod
    def from_heads(cls, q_heads: Tensor, groups: int, head_dim: int) -> HeadSelection:
        """From sorted unique query-head indices, ``groups`` query heads per KV head (1: no GQA)."""
        kv_of_q = q_heads // groups
        kv_heads = torch.unique(kv_of_q)
        q_to_kv = torch.searchsorted(kv_heads, kv_of_q) if groups > 1 else None
        counts = torch.bincount(q_to_kv) if q_to_kv is not None and len(q_to_kv) else None
        even = counts is not None and bool((counts == counts[0]).all())
        rows = partial(head_rows, head_dim=head_dim)
        return cls(q_heads, kv_heads, rows(q_heads), rows(kv_heads), q_to_kv, even)


@dataclass(frozen=True)
class LayerSelection:
    """One decoder layer's kept units on this rank for one step, resolved on the host.

    ``heads`` / ``channels``: None where that half of the layer runs dense (nothing omitted);
    otherwise this rank's kept local heads (a :class:`HeadSelection`) / local channel indices, possibly
    empty under tensor parallelism (the rank holds none of the kept units). ``head_offset`` /
    ``channel_offset``: the global index of this rank's first local unit (0 without TP).
    """

    heads: HeadSelection | None
    channels: Tensor | None
    head_offset: int = 0
    channel_offset: int = 0


class Resolved(dict):
    """:func:`resolve`'s {layer index: :class:`LayerSelection`}, which also keeps the device copies of its
    index tensors (:func:`device_indices`): a resolution reused over steps (:class:`ResolveCache` hands back
    the same object) builds and copies them once, not at every ``omit`` context."""

    on_device: tuple[tuple[torch.device, TensorShard | None], list[Tensor]] | None = None


def resolve(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
            shard: TensorShard | None = None) -> Resolved:
    """Every layer's selection on this rank, validated once (indices are read on the host)."""
    layers = decoder_layers(model_or_layers)
    unknown = (set(keep_heads) | set(keep_channels)) - set(layers)
    if unknown:
        raise ValueError(f"omit(): no decoder layer with index {sorted(unknown)}")
    out = Resolved()
    for index, layer in layers.items():
        attn = layer.self_attn
        config = attn.config
        heads = channels = None
        if index in keep_heads:
            heads = HeadSelection.of(attn, keep_heads[index].cpu())
            if len(heads.q_heads) == config.num_attention_heads:
                heads = None
            elif shard is not None:
                groups = config.num_attention_heads // config.num_key_value_heads
                heads = HeadSelection.from_heads(in_block(heads.q_heads, shard.heads), groups, attn.head_dim)
        if index in keep_channels:
            n = config.intermediate_size
            channels = unique_indices(keep_channels[index].cpu(), n, f"layer {index} channels")
            if len(channels) == n:
                channels = None
            elif shard is not None:
                channels = in_block(channels, shard.channels)
        out[index] = LayerSelection(heads, channels, 0 if shard is None else shard.heads.start,
                                    0 if shard is None else shard.channels.start)
    return out


class ResolveCache:
    """:func:`resolve` (or a model family's) once per selection.

    Re-selecting every step (``sat.reselect_every: 1``) mostly gives the kept units of the step before (the
    top-k of slowly moving scores): a cache hit took 0.045 ms against 1.9 ms to resolve the ``small``
    preset's 8 layers on the 2-core CPU (docs/benchmark/step/small_probe/resolve_probe.txt). Kept indices
    are compared by value, the layers and the TP shard by identity / equality, so a new model (a V-cycle
    level) or another shard resolves again. A hit also reuses the resolution's device index copies
    (:class:`Resolved`).
    """

    def __init__(self, resolve_fn: Callable[..., Any] = resolve) -> None:
        self.resolve_fn = resolve_fn
        self.resolutions = 0  # calls that resolved (a selection unlike the one before)
        self._key: tuple | None = None
        self._value: Any = None

    def __call__(self, layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
                 shard: TensorShard | None = None) -> Any:
        key = (id(layers), shard, dict(keep_heads), dict(keep_channels))
        if self._key is None or not self._same(self._key, key):
            self._value = self.resolve_fn(layers, keep_heads, keep_channels, shard)
            self._key = key
            self.resolutions += 1
        return self._value

    @staticmethod
    def _same(old: tuple, new: tuple) -> bool:
        if old[:2] != new[:2]:
            return False
        return all(a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a) for a, b in zip(old[2:], new[2:]))


def to_device(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """Host index tensors on ``device`` in one copy (pinned and asynchronous on an accelerator)."""
    if device.type == "cpu" or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = flat.pin_memory().to(device, non_blocking=True)
    return list(flat.split([t.numel() for t in tensors]))


class _Slice:
    """The kept part of one weight along ``dim`` for one step, and its accumulated gradient."""

    def __init__(self, dim: int, index: Tensor, emit_every: int, keep: bool) -> None:
        self.dim, self.index, self.emit_every, self.keep = dim, index, emit_every, keep
        self.value: Tensor | None = None
        self.grad: Tensor | None = None
        self.shape: torch.Size | None = None
        self.gathers = 0
        self.backwards = 0


class _SlicedWeight(torch.autograd.Function):
    """``weight.index_select(dim, index)`` gathered once per step; the gradient reaches ``weight`` once.

    The backward of every micro-batch adds into the slice's gradient; the ``emit_every``-th writes the
    full-size gradient (zero outside the kept rows / columns) and returns None in between, so the
    weight's gradient accumulator and DeepSpeed's hooks on it run once per step.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, entry: _Slice) -> Tensor:
        ctx.entry = entry
        if entry.value is not None:
            return entry.value.detach()
        value = weight.index_select(entry.dim, entry.index)
        entry.shape, entry.gathers = weight.shape, entry.gathers + 1
        if entry.keep:
            entry.value = value.detach()  # no reference from the cache to this call's graph
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        entry = ctx.entry
        entry.grad = grad if entry.grad is None else entry.grad + grad
        entry.backwards += 1
        if entry.backwards % entry.emit_every:
            return None, None
        full = grad.new_zeros(entry.shape).index_copy_(entry.dim, entry.index, entry.grad)
        entry.grad = None
        return full, None


class StepSlices:
    """The sliced weights of one :func:`omit` context (see the module docstring).

    ``direct``: the caller knows every weight is used by one forward only (one micro-batch, no
    recomputation), so each slice is a plain ``index_select``. It stays correct if that is wrong (a second
    use gathers again and autograd adds both gradients); only the gather-once saving is lost.
    """

    def __init__(self, micro_batches: int = 1, keep: bool = True, direct: bool = False) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if direct and micro_batches > 1:
            raise ValueError("StepSlices(direct=True) needs micro_batches=1: the slices of several micro-batches "
                             "hand their gradient to the weight once, which index_select's own backward cannot")
        self.micro_batches, self.keep, self.direct = micro_batches, keep, direct
        self.entries: dict[int, _Slice] = {}
        self.direct_gathers = 0

    def __call__(self, param: Tensor | None, dim: int, index: Tensor) -> Tensor | None:
        if param is None:
            return None
        if self.direct:
            self.direct_gathers += 1
            return param.index_select(dim, index)
        entry = self.entries.get(id(param))
        if entry is None:
            entry = self.entries[id(param)] = _Slice(dim, index, self.micro_batches, self.keep)
        return _SlicedWeight.apply(param, entry)

    @property
    def gathers(self) -> int:
        """Weight gathers (index_select of a whole weight) so far; with ``keep``, one per sliced weight."""
        return self.direct_gathers + sum(e.gathers for e in self.entries.values())

    def abandon(self) -> None:
        """Drop the gradients of an unfinished step (its backward passes will not all come)."""
        for entry in self.entries.values():
            entry.grad, entry.backwards = None, 0

    def check_complete(self) -> None:
        """Every sliced weight got its gradient: the backward passes came in whole steps."""
        pending = [e.backwards for e in self.entries.values() if e.backwards % e.emit_every]
        if pending:
            raise RuntimeError(f"omit(): {pending[0]} backward passes ran for micro_batches={self.micro_batches}; "
                               "the sliced gradients of the unfinished step were not written to the weights")


def _output(linear: nn.Module, a: Tensor, weight: Tensor | None, shard: TensorShard | None) -> Tensor:
    """a W[:, columns]^T + b: the output projection (o_proj, down_proj) on some of its input features.

    Under tensor parallelism the ranks' partial products are summed and the replicated bias is added
    once, after the sum. ``weight`` None: this rank keeps none of its features and contributes
    ``0 * a`` (``a`` is then the layer input, of the output's width), which keeps the rank in both
    collectives of the forward and of the backward.
    """
    if shard is None:
        return F.linear(a, weight, linear.bias)
    part = a * 0 if weight is None else F.linear(a, weight)
    out = shard.reduce(part)
    return out if linear.bias is None else out + linear.bias


def _hf_uses_gqa(attention_mask: Tensor | None, key: Tensor, value: Tensor) -> bool:
    """transformers' choice for its own SDPA attention (``use_gqa_in_sdpa``), which took (mask, key) before
    it also took ``value`` (to refuse head dims above 256)."""
    if _GQA_TAKES_VALUE:
        return use_gqa_in_sdpa(attention_mask, key, value)
    return use_gqa_in_sdpa(attention_mask, key)


_GQA_TAKES_VALUE = len(inspect.signature(use_gqa_in_sdpa).parameters) >= 3


def attend(q: Tensor, k: Tensor, v: Tensor, q_to_kv: Tensor | None, even_groups: bool,
           attention_mask: Tensor | None, **sdpa: Any) -> Tensor:
    """Scaled-dot-product attention of the kept query heads on the kept KV heads ([batch, heads, seq, dim]).

    GQA with evenly shared KV heads goes to SDPA's own GQA (``enable_gqa``) where HF's dense Llama attention
    uses it (transformers' ``use_gqa_in_sdpa``; on CPU and CUDA: no mask, head_dim <= 256), so SAT's
    attention is the dense kernel at a smaller width. Otherwise each kept query head gets a copy of its KV head
    (``index_select``), whose backward scatters: on the ``small`` preset's kept heads that took 1.97-2.72 ms
    against 1.67-1.75 ms per layer forward + backward (docs/benchmark/step/gqa_probe/gqa_micro.txt).
    """
    gqa = q_to_kv is not None and even_groups and _hf_uses_gqa(attention_mask, k, v)
    if q_to_kv is not None and not gqa:
        k, v = k.index_select(1, q_to_kv), v.index_select(1, q_to_kv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=gqa, **sdpa)


@dataclass(frozen=True)
class _AttentionIndex:
    q_rows: Tensor
    kv_rows: Tensor
    q_to_kv: Tensor | None
    even_groups: bool
    kept: Tensor  # global query heads, for recording


@dataclass(frozen=True)
class _MLPIndex:
    channels: Tensor
    kept: Tensor  # global channels, for recording


def _sliced_attention(attn: nn.Module, index: _AttentionIndex | None, shard: TensorShard | None,
                      record: Recorder | None, slices: StepSlices, hidden_states: Tensor,
                      position_embeddings: tuple[Tensor, Tensor] | None = None,
                      attention_mask: Tensor | None = None, cache: Any = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """LlamaAttention.forward on the kept heads only; same signature and (output, None) return.

    ``index`` addresses this rank's own rows (all of them without tensor parallelism); None: it keeps none.
    """
    if cache is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("omit(): a KV cache cannot hold omitted heads; call the model with use_cache=False")
    x = hidden_states if shard is None else shard.enter(hidden_states)
    if index is None:
        return _output(attn.o_proj, x, None, shard), None
    head_shape = (-1, attn.head_dim)

    def project(linear: nn.Linear, rows: Tensor) -> Tensor:
        return F.linear(x, slices(linear.weight, 0, rows), slices(linear.bias, 0, rows))

    q = project(attn.q_proj, index.q_rows).unflatten(-1, head_shape).transpose(1, 2)
    k = project(attn.k_proj, index.kv_rows).unflatten(-1, head_shape).transpose(1, 2)
    v = project(attn.v_proj, index.kv_rows).unflatten(-1, head_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = attend(q, k, v, index.q_to_kv, index.even_groups, attention_mask,
                 dropout_p=attn.attention_dropout if attn.training else 0.0,
                 is_causal=attention_mask is None and q.shape[2] > 1, scale=attn.scaling)
    out = out.transpose(1, 2).flatten(-2)
    weight = slices(attn.o_proj.weight, 1, index.q_rows)
    if record is not None:
        record(out, kept=index.kept, weight=weight.detach())
    return _output(attn.o_proj, out, weight, shard), None


def _sliced_mlp(mlp: nn.Module, index: _MLPIndex | None, shard: TensorShard | None, record: Recorder | None,
                slices: StepSlices, x: Tensor) -> Tensor:
    """LlamaMLP.forward on the kept channels only (this rank's local indices; None: it keeps none)."""
    x = x if shard is None else shard.enter(x)
    if index is None:
        return _output(mlp.down_proj, x, None, shard)
    c = index.channels
    gate = F.linear(x, slices(mlp.gate_proj.weight, 0, c), slices(mlp.gate_proj.bias, 0, c))
    a = mlp.act_fn(gate) * F.linear(x, slices(mlp.up_proj.weight, 0, c), slices(mlp.up_proj.bias, 0, c))
    weight = slices(mlp.down_proj.weight, 1, c)
    if record is not None:
        record(a, kept=index.kept, weight=weight.detach())
    return _output(mlp.down_proj, a, weight, shard)


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


def _observe_dense(linear: nn.Module, record: Recorder, kept: Tensor | None) -> Callable[[], None]:
    """Observe the dense input of the output projection (a forward pre-hook): all units, or this rank's
    block (``kept``, global indices) under TP."""
    return linear.register_forward_pre_hook(
        lambda mod, args: record(args[0], kept=kept, weight=mod.weight.detach())).remove


def _host_indices(sel: LayerSelection, shard: TensorShard | None) -> list[Tensor]:
    """The host index tensors of one layer's selection, in the order :func:`_device_indices` reads them."""
    out: list[Tensor] = []
    heads, channels = sel.heads, sel.channels
    if heads is not None and len(heads.q_heads):
        out += [heads.q_rows, heads.kv_rows, heads.q_heads + sel.head_offset]
        out += [] if heads.q_to_kv is None else [heads.q_to_kv]
    if channels is not None and len(channels):
        out += [channels, channels + sel.channel_offset]
    if shard is not None:
        out += [torch.arange(shard.heads.start, shard.heads.stop),
                torch.arange(shard.channels.start, shard.channels.stop)]
    return out


def device_indices(selection: dict[int, LayerSelection], layers: dict[int, nn.Module], shard: TensorShard | None,
                   device: torch.device) -> list[Tensor]:
    """Every layer's :func:`_host_indices` on ``device``, in layer order: kept by a :class:`Resolved` selection
    for its (device, shard), so a selection reused over steps is copied once; a plain dict is copied anew."""
    key = (device, shard)
    if isinstance(selection, Resolved) and selection.on_device is not None and selection.on_device[0] == key:
        return selection.on_device[1]
    out = to_device([t for index in layers for t in _host_indices(selection[index], shard)], device)
    if isinstance(selection, Resolved):
        selection.on_device = (key, out)
    return out


def _device_indices(sel: LayerSelection, shard: TensorShard | None, dev: Iterator[Tensor]
                    ) -> tuple[_AttentionIndex | None, _MLPIndex | None, Tensor | None, Tensor | None]:
    """One layer's index tensors, taken from the device copies of :func:`_host_indices`: the sliced
    attention's and MLP's (None: this rank keeps none) and, under TP, the global units of this rank's
    block that a dense half records."""
    heads, channels = sel.heads, sel.channels
    attn = mlp = None
    if heads is not None and len(heads.q_heads):
        q_rows, kv_rows, kept = next(dev), next(dev), next(dev)
        attn = _AttentionIndex(q_rows, kv_rows, None if heads.q_to_kv is None else next(dev), heads.even_groups, kept)
    if channels is not None and len(channels):
        mlp = _MLPIndex(next(dev), next(dev))
    block_heads, block_channels = (next(dev), next(dev)) if shard is not None else (None, None)
    return attn, mlp, block_heads, block_channels


@contextmanager
def _no_kv_cache(layers: dict[int, nn.Module]) -> Iterator[None]:
    """Training builds no KV cache under omission (as HF turns caching off under gradient checkpointing):
    a cache could not hold the omitted heads, and there is nothing to generate from in a training step."""
    configs = {id(layer.self_attn.config): layer.self_attn.config for layer in layers.values()}
    previous = {key: config.use_cache for key, config in configs.items()}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = previous[key]


GATHER_ONCE_ON_GPU_NUMEL = 1 << 22  # weights from 4M elements up: the scatter outweighs the host's Python


def slice_directly(device: torch.device, micro_batches: int, forwards: int, recomputed: bool,
                   weight_numel: int) -> bool:
    """Plain ``index_select`` slices (``StepSlices.direct``) for one forward per weight, unless on a GPU with
    large weights (``weight_numel``: the MLP's down projection).

    Its backward scatters with ``index_add_``. On an H200 in bf16 that took 1.10 ms over a Llama-2-7B layer's
    weights against 0.57 ms for the gather-once function's ``index_copy_`` (the kept indices are unique, so
    the two agree), and the whole step was 1.02-1.05x faster with the latter; on the launch-bound ``small``
    preset (176K-element weights) the function's host time made the step 0.88x as fast
    (docs/benchmark/gpu/probe/). The CPU has no atomics to avoid and pays the Python function everywhere: on
    a 7B layer the two ways' whole steps tied there (paired medians 1.005 and 0.996 at r = 0.25 and 0.5,
    docs/benchmark/step/scatter_probe/scatter_probe.txt).
    """
    large_on_gpu = device.type != "cpu" and weight_numel >= GATHER_ONCE_ON_GPU_NUMEL
    return micro_batches == forwards == 1 and not recomputed and not large_on_gpu


@contextmanager
def omit(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
         tracker: ImportanceTracker | None = None, shard: TensorShard | None = None,
         micro_batches: int = 1, keep_slices: bool = True,
         selection: dict[int, LayerSelection] | None = None, forwards: int | None = None) -> Iterator[StepSlices]:
    """Within the context, forward and backward compute only the kept heads and MLP channels.

    ``keep_heads`` / ``keep_channels``: {layer index: kept query-head / channel indices}; a layer missing
    from a dict, or keeping all its units, stays dense (HF's forward, untouched). With a ``tracker``,
    every layer records importance in the same forward: ``omit(model, {}, {}, tracker)`` is the dense
    recording step for omission rate 0. Run the backward inside the context when gradient checkpointing
    recomputes layers. Leaving the context removes every swapped forward and hook. The model builds no
    KV cache inside the context (``config.use_cache`` is off; an explicit cache is an error).

    One context is one optimizer step: ``micro_batches`` forward/backward passes share the weight
    slices, and the weights get their gradient at the last backward (see the module docstring);
    ``keep_slices=False`` re-gathers the slices at every use. ``forwards``: the forward passes the context
    will run (default ``micro_batches``; more when an engine takes the gradients at every backward of an
    accumulated step). The context yields its :class:`StepSlices` (``.gathers`` counts the weight
    gathers; ``.direct``: plain ``index_select`` slices, chosen for one forward without HF gradient
    checkpointing on the layers).

    ``shard``: under tensor parallelism, this rank's block; the dicts still hold global indices (the
    same on every rank) and the tracker records each unit on the rank that holds it. ``selection``:
    the dicts already resolved by :func:`resolve` (an engine resolves once per step and reuses it).
    A Megatron-core model (or its layers) is delegated to ``ds_accel.megatron.sat.omit`` (same meaning;
    its ``selection`` from ``ds_accel.megatron.sat.resolve``).
    """
    if "megatron.core" in sys.modules:  # only then can a Megatron model exist
        from ds_accel.megatron import sat as megatron

        if megatron.is_megatron(model_or_layers):
            with megatron.omit(model_or_layers, keep_heads, keep_channels, tracker, shard, micro_batches,
                               keep_slices, selection) as megatron_slices:
                yield megatron_slices
            return
    layers = decoder_layers(model_or_layers)
    selection = resolve(layers, keep_heads, keep_channels, shard) if selection is None else selection
    recomputed = any(getattr(layer, "gradient_checkpointing", False) for layer in layers.values())
    forwards = micro_batches if forwards is None else forwards
    down = layers[next(iter(layers))].mlp.down_proj.weight
    device = down.device
    direct = slice_directly(device, micro_batches, forwards, recomputed, down.numel())
    slices = StepSlices(micro_batches, keep_slices, direct=direct)
    dev = iter(device_indices(selection, layers, shard, device))
    with ExitStack() as undo:
        undo.enter_context(_no_kv_cache(layers))
        for index, layer in layers.items():
            sel = selection[index]
            attn_index, mlp_index, block_heads, block_channels = _device_indices(sel, shard, dev)
            attn, mlp = layer.self_attn, layer.mlp
            if sel.heads is not None:
                record = None if tracker is None else partial(tracker.record_heads, index)
                undo.callback(_swap_forward(attn, partial(_sliced_attention, attn, attn_index, shard, record, slices)))
            elif tracker is not None:
                undo.callback(_observe_dense(attn.o_proj, partial(tracker.record_heads, index), block_heads))
            if sel.channels is not None:
                record = None if tracker is None else partial(tracker.record_channels, index)
                undo.callback(_swap_forward(mlp, partial(_sliced_mlp, mlp, mlp_index, shard, record, slices)))
            elif tracker is not None:
                undo.callback(_observe_dense(mlp.down_proj, partial(tracker.record_channels, index), block_channels))
        yield slices
    slices.check_complete()


def kept_fraction(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict) -> dict[str, float]:
    """Fraction of query heads, KV heads and MLP channels computed under a selection, over all layers."""
    names = ("heads", "kv_heads", "channels")
    kept, total = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for index, layer in decoder_layers(model_or_layers).items():
        config, n_channels = layer.self_attn.config, layer.mlp.intermediate_size
        heads = HeadSelection.of(layer.self_attn, keep_heads.get(index, torch.arange(config.num_attention_heads)).cpu())
        channels = unique_indices(keep_channels.get(index, torch.arange(n_channels)).cpu(), n_channels, "channels")
        for key, k, n in (("heads", len(heads.q_heads), config.num_attention_heads),
                          ("kv_heads", len(heads.kv_heads), config.num_key_value_heads),
                          ("channels", len(channels), n_channels)):
            kept[key] += k
            total[key] += n
    return {key: kept[key] / total[key] for key in kept}


__all__ = ["HeadSelection", "LayerSelection", "ResolveCache", "Resolved", "StepSlices", "device_indices",
           "kept_fraction", "omit", "resolve", "to_device"]

"""What the optimizer step does to omitted units: SAT's optimizer policy (Ma et al., 2024; our policy).

An omitted row gets a zero gradient, yet AdamW would still move it: weight decay shrinks it, the first
moment keeps pushing it (m <- b1 m, update m_hat / (sqrt(v_hat) + eps)) and both moments decay. Two
policies (``sat.optimizer_policy``):

* ``adam``: stock AdamW on the full tensors; omitted rows see their zero gradient. No bookkeeping at
  all: this is what any SAT run on an unmodified optimizer gets.
* ``freeze``: omitted weights and both moments come out of the step bit-identical. The guard hooks
  the step of the *inner* torch optimizer (``register_step_pre_hook`` / ``register_step_post_hook``),
  which under DeepSpeed steps this rank's flat fp32 partition: before the step it copies the omitted
  elements of every piece of that partition it is told about (the master weight and its Adam moments),
  after the step it writes them back, before DeepSpeed copies the partition into the 16-bit model
  weights and gathers them. The cost is the omitted elements of this rank's own partition, in time and
  memory; nothing is indexed over a whole parameter.

A row of a (rows, cols) weight is a contiguous run of its flattened buffer, and a flat partition holds
one contiguous range [start, start + numel) of it: partial rows at both ends and whole rows between.
:class:`FragmentPlan` turns "omitted rows (or columns) of this weight" into at most three reads of such a
range (the head and tail partial rows, one ``index_select`` over the whole rows), with index tensors
no longer than the weight's rows or columns.

The one shared quantity is the per-tensor ``step`` counter used for bias correction: it advances for
the whole tensor, so when an omitted row comes back, its moments are bias-corrected as if they had been
updated every step (1 - b^t is ~1 after the first few hundred steps, so this matters only at the start).
State that the step creates (a parameter's first step) is left as the optimizer made it; for Adam, zero
gradients leave zero moments, the same as their initial value.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ds_accel.sat.omit import LayerSelection, resolve, to_device
from ds_accel.structure import KeepDict, TensorShard, decoder_layers, head_rows

POLICIES = ("freeze", "adam")


@dataclass(frozen=True)
class OmittedSlice:
    """Rows (dim 0) or columns (dim 1) of one parameter that a step omits.

    layer: decoder layer index; name: parameter name within the layer (e.g. "self_attn.q_proj.weight");
    index: omitted indices along ``dim``, sorted, on the host.
    """

    layer: int
    name: str
    param: Tensor
    dim: int
    index: Tensor


def _complement(kept: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def omitted_slices(model_or_layers: Any, keep_heads: KeepDict, keep_channels: KeepDict,
                   shard: TensorShard | None = None,
                   selection: dict[int, LayerSelection] | None = None) -> list[OmittedSlice]:
    """Every omitted parameter slice of a selection (the inverse view of :func:`omit`).

    Heads: rows of q_proj (weight, bias) of the omitted query heads, rows of k_proj / v_proj of the KV
    heads no kept query head uses, columns of o_proj.weight of the omitted query heads. Channels: rows
    of gate_proj / up_proj (weight, bias), columns of down_proj.weight. The output biases of o_proj and
    down_proj always take part and are never omitted.

    ``shard`` (tensor parallelism): this rank's block of heads and channels; the selection is global,
    the slices index the rows / columns of the block this rank holds. ``selection``: the dicts already
    resolved by :func:`ds_accel.sat.omit.resolve`.
    """
    layers = decoder_layers(model_or_layers)
    selection = resolve(layers, keep_heads, keep_channels, shard) if selection is None else selection
    slices: list[OmittedSlice] = []
    for index, layer in layers.items():
        sel, attn = selection[index], layer.self_attn
        config = attn.config
        parts: list[tuple[str, int, Tensor]] = []
        if sel.heads is not None:
            n_heads = config.num_attention_heads if shard is None else len(shard.heads)
            groups = config.num_attention_heads // config.num_key_value_heads
            q_rows = head_rows(_complement(sel.heads.q_heads, n_heads), attn.head_dim)
            kv_rows = head_rows(_complement(sel.heads.kv_heads, n_heads // groups), attn.head_dim)
            parts += [("self_attn.q_proj", 0, q_rows), ("self_attn.k_proj", 0, kv_rows),
                      ("self_attn.v_proj", 0, kv_rows), ("self_attn.o_proj", 1, q_rows)]
        if sel.channels is not None:
            n_channels = config.intermediate_size if shard is None else len(shard.channels)
            omitted = _complement(sel.channels, n_channels)
            parts += [("mlp.gate_proj", 0, omitted), ("mlp.up_proj", 0, omitted), ("mlp.down_proj", 1, omitted)]
        for module_name, dim, rows in parts:
            linear = layer.get_submodule(module_name)
            names = ["weight"] + (["bias"] if dim == 0 and linear.bias is not None else [])
            slices += [OmittedSlice(index, f"{module_name}.{name}", getattr(linear, name), dim, rows)
                       for name in names if rows.numel()]
    return slices


@dataclass(frozen=True)
class _Piece:
    """One read of a flat fragment: ``[offset, offset + length)`` of it, as a (rows, width) block, and
    the ``dim`` / ``index`` (None: all of it) to select in that block."""

    offset: int
    rows: int
    width: int
    dim: int
    index: Tensor | None

    def read(self, flat: Tensor) -> Tensor:
        block = flat.narrow(0, self.offset, self.rows * self.width).view(self.rows, self.width)
        return block.clone() if self.index is None else block.index_select(self.dim, self.index)

    def write(self, flat: Tensor, saved: Tensor) -> None:
        block = flat.narrow(0, self.offset, self.rows * self.width).view(self.rows, self.width)
        # columns: scatter_ took 78 against index_copy_'s 183 us on a 256 x 688 weight; rows the other way
        # round, 228 against 41 us (docs/benchmark/step/freeze_probe/writeback_micro.txt)
        if self.index is None:
            block.copy_(saved)
        elif self.dim == 1 and self.rows > 1:
            block.scatter_(1, self.index.expand(self.rows, -1), saved)
        else:
            block.index_copy_(self.dim, self.index, saved)


def _within(index: Tensor, lo: int, hi: int) -> Tensor:
    """The sorted ``index`` values in [lo, hi), minus lo."""
    a, b = torch.searchsorted(index, torch.tensor([lo, hi])).tolist()
    return index[a:b] - lo


@dataclass(frozen=True)
class FragmentPlan:
    """The omitted elements of one weight that fall in a flat fragment ``[start, start + numel)`` of it.

    ``shape``: the weight's (rows, cols) (a 1-D parameter is (n, 1)); ``dim`` / ``index``: the omitted rows
    (0) or columns (1), sorted host indices. :meth:`save` / :meth:`restore` act on a 1-D view of the
    fragment (element 0 of the view is element ``start`` of the flattened weight).
    """

    pieces: tuple[_Piece, ...]

    @classmethod
    def build(cls, shape: Sequence[int], dim: int, index: Tensor, start: int, numel: int) -> FragmentPlan:
        cols = shape[1] if len(shape) == 2 else 1
        end = start + numel
        first_full, last_full = -(-start // cols), end // cols  # whole rows [first_full, last_full)
        pieces: list[tuple[int, int, int, int, Tensor | None]] = []

        def partial_row(row: int, lo: int, hi: int) -> None:  # flat [lo, hi) inside row ``row``
            c0, width = lo - row * cols, hi - lo
            if dim == 0:
                if _within(index, row, row + 1).numel():
                    pieces.append((lo - start, 1, width, 1, None))
            else:
                local = _within(index, c0, c0 + width)
                if local.numel():
                    pieces.append((lo - start, 1, width, 1, local))

        if start % cols:
            partial_row(start // cols, start, min(first_full * cols, end))
        if last_full > first_full:
            rows = last_full - first_full
            local = _within(index, first_full, last_full) if dim == 0 else index
            if local.numel():
                pieces.append((first_full * cols - start, rows, cols, dim, local))
        if end % cols and last_full >= first_full:
            partial_row(last_full, max(last_full * cols, start), end)
        return cls(tuple(_Piece(o, r, w, d, i) for o, r, w, d, i in pieces))

    @property
    def numel(self) -> int:
        return sum(p.rows * p.width if p.index is None else
                   p.index.numel() * (p.width if p.dim == 0 else p.rows) for p in self.pieces)

    def save(self, flat: Tensor) -> list[Tensor]:
        return [p.read(flat) for p in self.pieces]

    def restore(self, flat: Tensor, saved: list[Tensor]) -> None:
        for piece, values in zip(self.pieces, saved):
            piece.write(flat, values)


@dataclass(frozen=True)
class FrozenFragment:
    """One piece of optimizer-owned memory to keep unchanged over a step: a flat ``master`` view (the
    tensor the inner optimizer steps, or a slice of it) and the views of its per-element state
    (``exp_avg``, ``exp_avg_sq``, ...), all covering the same elements, and the omitted ones in it."""

    plan: FragmentPlan
    master: Tensor
    state: tuple[Tensor, ...]


def fragment_plans(slices: Sequence[OmittedSlice], wanted: Sequence[tuple[int, int, int]], device: torch.device,
                   cache: dict | None = None) -> list[FragmentPlan]:
    """:meth:`FragmentPlan.build` for each ``(i, start, numel)`` of ``wanted`` (slice ``slices[i]`` over that
    fragment of its parameter), new index tensors on ``device`` in one copy. ``cache``: a dict kept with one
    list of slices (one resolved selection), so the steps that reuse the selection reuse its plans: the host
    work and the copy are paid when the kept units change, not every step."""
    cache = {} if cache is None else cache
    missing = [key for key in wanted if key not in cache]
    built = [FragmentPlan.build(getattr(slices[i].param, "ds_shape", slices[i].param.shape),  # ZeRO-3: 1-D placeholder
                                slices[i].dim, slices[i].index, start, numel) for i, start, numel in missing]
    cache.update(zip(missing, plans_on_device(built, device)))
    return [cache[key] for key in wanted]


def plans_on_device(plans: Sequence[FragmentPlan], device: torch.device) -> list[FragmentPlan]:
    """The plans with their index tensors on ``device``, in one copy for all of them."""
    indexed = [p.index for plan in plans for p in plan.pieces if p.index is not None]
    moved = iter(to_device(indexed, device))
    return [FragmentPlan(tuple(p if p.index is None else _Piece(p.offset, p.rows, p.width, p.dim, next(moved))
                               for p in plan.pieces)) for plan in plans]


def _storage_range(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class OmittedStateGuard:
    """The ``freeze`` policy on one torch optimizer (see the module docstring).

    ``arm(resolve)`` for a step: ``resolve()`` is called at the first inner step of that step (when the
    optimizer state exists) and returns the :class:`FrozenFragment` s; every inner ``step()`` then saves
    and restores those whose master lies in the tensors it steps (DeepSpeed's ZeRO-3 steps one sub-group
    at a time). ``disarm()`` after the step. ``saved_elements`` is the size of the last snapshot,
    ``seconds`` the host time spent in the hooks so far.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._resolve: Callable[[], list[FrozenFragment]] | None = None
        self._fragments: list[FrozenFragment] | None = None
        self._saved: list[tuple[FrozenFragment, list[list[Tensor]]]] = []
        self.saved_elements = 0
        self.seconds = 0.0
        self._handles = [optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(self._after)]

    def arm(self, resolve: Callable[[], list[FrozenFragment]]) -> None:
        self._resolve, self._fragments = resolve, None

    def disarm(self) -> None:
        self._resolve, self._fragments, self._saved = None, None, []

    def remove(self) -> None:
        self.disarm()
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._resolve is None:
            return
        start = time.perf_counter()
        if self._fragments is None:
            self._fragments = self._resolve()
        stepped = [_storage_range(p) for group in optimizer.param_groups for p in group["params"]]
        self._saved = []
        for f in self._fragments:
            lo, hi = _storage_range(f.master)
            if any(a <= lo and hi <= b for a, b in stepped):
                self._saved.append((f, [f.plan.save(view) for view in (f.master, *f.state)]))
        self.saved_elements = sum(f.plan.numel * (1 + len(f.state)) for f, _ in self._saved)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        start = time.perf_counter()
        for f, saved in self._saved:
            for view, values in zip((f.master, *f.state), saved):
                f.plan.restore(view, values)
        self._saved = []
        self.seconds += time.perf_counter() - start


def whole_parameter_fragments(optimizer: torch.optim.Optimizer, slices: Sequence[OmittedSlice],
                              cache: dict | None = None) -> list[FrozenFragment]:
    """Fragments for a plain torch optimizer stepping the model's own parameters: each omitted slice's
    whole parameter and its per-element state tensors (AdamW's moments; any state of the parameter's shape).
    ``cache``: see :func:`fragment_plans`."""
    if not slices:
        return []
    plans = fragment_plans(slices, [(i, 0, s.param.numel()) for i, s in enumerate(slices)], slices[0].param.device,
                           cache)
    fragments = []
    for s, plan in zip(slices, plans):
        state = optimizer.state.get(s.param, {})
        views = tuple(v.view(-1) for v in state.values() if torch.is_tensor(v) and v.shape == s.param.shape)
        fragments.append(FrozenFragment(plan, s.param.data.view(-1), views))
    return fragments


@contextmanager
def guard_omitted(optimizer: torch.optim.Optimizer, slices: Sequence[OmittedSlice]) -> Iterator[None]:
    """Around ``optimizer.step()`` of a plain torch optimizer: omitted slices of parameters and of their
    per-element state stay bit-identical (the ``freeze`` policy).

    Usage: ``with guard_omitted(opt, omitted_slices(model, keep_heads, keep_channels)): opt.step()``.
    """
    guard = OmittedStateGuard(optimizer)
    guard.arm(lambda: whole_parameter_fragments(optimizer, slices))
    try:
        yield
    finally:
        guard.remove()


__all__ = ["POLICIES", "FragmentPlan", "FrozenFragment", "OmittedSlice", "OmittedStateGuard", "fragment_plans",
           "guard_omitted", "omitted_slices", "plans_on_device", "whole_parameter_fragments"]

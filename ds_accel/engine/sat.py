"""SAT inside a DeepSpeed engine: the plumbing around the pure ``ds_accel.sat`` functions.

What lives here and nowhere else:
- importance scores are averaged over the data-parallel group before every selection, so all ranks
  omit the same heads and channels; the selection runs on the host, once per step (one copy of the
  scores from the device), and is resolved once into the index tensors the sliced forward uses;
- under ZeRO-3 the sliced forward reads ``q_proj.weight`` etc. without calling those modules, so the
  weights are registered as external parameters of the attention / MLP module
  (``deepspeed.zero.register_external_parameter``): DeepSpeed then gathers them for that module's
  forward and backward. The weight slices are then taken at every use (holding them over the step
  would keep (1 - r) of the whole model on every rank); under ZeRO 0-2 once per step;
- ``sat.optimizer_policy: freeze`` keeps omitted rows out of the AdamW update: the guard of
  ``ds_accel.sat.optim_guard`` hooks the inner torch optimizer, which steps this rank's flat fp32
  partition, and is given the omitted elements of each parameter's piece of that partition (ZeRO-1/2
  and bf16: ``_hp_mapping`` fragments; ZeRO-3: the local partition; ZeRO-0 fp32: the parameter). The
  16-bit model weights follow, since DeepSpeed copies them from the partition after the inner step.

Tensor parallelism (AutoTP, see ``ds_accel.parallel.tensor``): a rank holds a block of every layer's
heads and channels. It computes the kept units of its block only and records their importance; the
scores are assembled over the TP group (each unit's from the rank that holds it, so they equal a
single process's) before the data-parallel average. Selection is global, by default balanced over
the TP blocks (``sat.tp_selection``); omitted rows are frozen in this rank's block of each
split parameter.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from ..config import SATConfig
from ..ds_private import (LocalFragment, gradient_every_backward, has_hp_mapping, hp_fragment, link_optimizer_state,
                          zero3_fragment)
from ..flops import LayerWidth
from ..parallel.tensor import TensorParallel, tensor_parallel
from ..sat import LORS, ImportanceTracker, omit, omitted_slices, select
from ..sat.importance import CHANNELS, HEADS
from ..sat.omit import ResolveCache, resolve
from ..sat.optim_guard import FrozenFragment, OmittedSlice, OmittedStateGuard, fragment_plans
from ..structure import UnitShape, decoder_layers
from .params import is_zero3

_MOMENTS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that does the arithmetic: below accelerate's wrapper, DeepSpeed's engine and
    ZeRO / bf16 optimizers (each keeps the one it wraps in ``.optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _local_fragment(p: torch.nn.Parameter, inner: torch.optim.Optimizer) -> LocalFragment | None:
    """The piece of ``p`` this rank's inner optimizer steps, with its Adam moments (see the module doc)."""
    if is_zero3(p):
        return zero3_fragment(p, _MOMENTS)
    mapped = hp_fragment(p, _MOMENTS)
    if mapped is not None or has_hp_mapping(p):
        return mapped
    state = inner.state.get(p, {})
    return LocalFragment(0, p.numel(), p.data.view(-1), tuple(state[k].view(-1) for k in _MOMENTS if k in state))


def frozen_fragments(inner: torch.optim.Optimizer, slices: list[OmittedSlice], cache: dict | None = None
                     ) -> list[FrozenFragment]:
    """The ``freeze`` policy's work for one step on this rank: every omitted slice, cut to the piece of
    its parameter in this rank's partition; index tensors go to the device in one copy. ``cache``: the
    plans of earlier steps with the same ``slices`` (:func:`~ds_accel.sat.optim_guard.fragment_plans`)."""
    parts = [(i, f) for i, f in enumerate(_local_fragment(s.param, inner) for s in slices) if f is not None and f.numel]
    if not parts:
        return []
    plans = fragment_plans(slices, [(i, f.start, f.numel) for i, f in parts], parts[0][1].master.device, cache)
    return [FrozenFragment(plan, f.master, f.state) for plan, (_, f) in zip(plans, parts) if plan.pieces]


@dataclass(frozen=True)
class DecoderFamily:
    """What SAT needs of one model family's decoder layers (the adapter /work/shared/STYLE.md asks for):
    a new family is one of these, not a branch in the controller.

    ``decoder_layers(model)``: {layer index: layer}; ``unit_shape(layer)``: its whole-model unit counts;
    ``tensor_parallel(model)``: this rank's TP layout or None; ``resolve(layers, keep_heads, keep_channels,
    shard)``: the step's selection in whatever form the next two reuse (once per step); ``omit(layers,
    keep_heads, keep_channels, tracker, shard, micro_batches, keep_slices, resolved, forwards)``: the
    sliced-step context (``micro_batches``: backward passes per gradient hand-over; ``forwards``: passes
    per step); ``omitted_slices(layers, keep_heads, keep_channels, shard, resolved)``: which rows / columns
    of which parameter the step omits; ``device(layer)``: where its weights live.
    """

    decoder_layers: Callable[[Any], dict[int, torch.nn.Module]]
    unit_shape: Callable[[torch.nn.Module], UnitShape]
    tensor_parallel: Callable[[Any], TensorParallel | None]
    resolve: Callable[..., Any]
    omit: Callable[..., Any]
    omitted_slices: Callable[..., list[OmittedSlice]]
    device: Callable[[torch.nn.Module], torch.device]


def _hf_unit_shape(layer: torch.nn.Module) -> UnitShape:
    return UnitShape.of(layer.self_attn.config)  # the full shape: under AutoTP the layers hold blocks of it


def _hf_omit(layers, keep_heads, keep_channels, tracker, shard, micro_batches, keep_slices, resolved, forwards):
    return omit(layers, keep_heads, keep_channels, tracker, shard=shard, micro_batches=micro_batches,
                keep_slices=keep_slices, selection=resolved, forwards=forwards)


HF_LLAMA = DecoderFamily(decoder_layers=decoder_layers, unit_shape=_hf_unit_shape, tensor_parallel=tensor_parallel,
                         resolve=resolve, omit=_hf_omit, omitted_slices=omitted_slices,
                         device=lambda layer: layer.mlp.down_proj.weight.device)


def gather_tp_scores(tracker: ImportanceTracker, tp: TensorParallel) -> None:
    """Each unit's score and seen flag from the TP rank that holds it, on every rank of the TP group.

    A rank records only its block, so its EMA is exact there and merely decayed elsewhere; a unit's
    EMA depends on its own statistics alone, so the assembled scores equal a single process's.
    """
    kinds = {HEADS: tp.shard.heads, CHANNELS: tp.shard.channels}
    parts = []
    for kind, block in kinds.items():
        held = torch.zeros_like(tracker.seen[kind])
        held[:, block.start:block.stop] = True
        parts += [torch.where(held, tracker.score[kind], 0.0), (tracker.seen[kind] & held).float()]
    flat = torch.cat([part.flatten() for part in parts])
    dist.all_reduce(flat, group=tp.group)
    values = iter(flat.split([part.numel() for part in parts]))
    for kind in kinds:
        tracker.score[kind].copy_(next(values).view_as(tracker.score[kind]))
        tracker.seen[kind].copy_(next(values).view_as(tracker.seen[kind]) > 0)


def _on_host(tracker: ImportanceTracker) -> ImportanceTracker:
    """A copy of the tracker whose scores live on the host: selection then reads them without a host
    synchronisation per layer. All of them travel in one copy, so the step waits for the device once
    here (one copy per tensor waited four times on an H200: docs/benchmark/gpu/probe/sync_sites.json)."""
    kinds = list(tracker.score)
    parts = [tracker.score[k] for k in kinds] + [tracker.seen[k] for k in kinds]
    flat = torch.cat([part.reshape(-1) for part in parts]).cpu()  # dtype promotion keeps every value exact
    values = iter(flat.split([part.numel() for part in parts]))
    host = copy.copy(tracker)
    host.score = {k: next(values).view_as(tracker.score[k]).to(tracker.score[k].dtype) for k in kinds}
    host.seen = {k: next(values).view_as(tracker.seen[k]).to(tracker.seen[k].dtype) for k in kinds}
    return host


class SATController:
    """Per-step SAT for one engine: rate from LORS, DP-averaged selection, sliced step, optimizer policy.

    Per optimizer step: ``begin_step(step)``; one ``with omitting():`` around every micro-batch's forward
    and backward (and the engine's step calls); ``end_step()``. ``attach(optimizer)`` once per engine.

    ``cfg.tp_selection`` (tensor parallelism only): "balanced" selects the top units within each TP
    rank's block, the same number on every rank; "global" the top-k over the layer. Each rank computes
    only its kept units and the row-parallel all-reduce waits for the slowest, so a step takes as long
    as the rank with the most kept units: a global top-k can keep all of a layer's units on one rank
    (at rate 0.5 and tp=2 the other rank idles and the layer saves no time). The price of "balanced"
    is a per-block quota on which units survive; the rate, and the FLOPs saved, are the same.

    ``bookkeeping_s``: host time spent choosing units, resolving them, updating importance and in the
    optimizer guard (its snapshot and write-back run inside the engine's step). ``selections`` /
    ``selection_changes``: how many times units were selected, and how many of those kept another set
    than the selection before (the first one and each LORS rung included): how often omitted units
    come back.
    """

    def __init__(self, cfg: SATConfig, model, total_steps: int, seed: int, dp_group=None, pipe_group=None,
                 micro_batches: int = 1, family: DecoderFamily = HF_LLAMA):
        """``model``: the model, or a pipeline stage's {layer index: block}; ``dp_group``: the ranks that
        must select alike (default: all); ``pipe_group``: the stages whose layers make up the model;
        ``micro_batches``: forward/backward passes per optimizer step (gradient accumulation);
        ``family``: the model family's :class:`DecoderFamily` (HF Llama, or ``ds_accel.megatron``'s)."""
        self.cfg, self.seed, self.micro_batches, self.family = cfg, seed, micro_batches, family
        self.dp_group, self.pipe_group = dp_group, pipe_group
        self.lors = LORS(total_steps, cfg.omission_rate, cfg.stage1_fraction, cfg.rungs, cfg.schedule)
        self.rate = 0.0
        self.guard: OmittedStateGuard | None = None
        self.emit_every = micro_batches  # backward passes per gradient hand-over (see attach)
        self.bookkeeping_s = 0.0
        self.selections = self.selection_changes = 0
        self.rebind(model)

    def rebind(self, model) -> None:
        """A new model (a V-cycle level): new shapes, so importance starts afresh."""
        family = self.family
        self.model = model
        self.layers = family.decoder_layers(model)
        self.tp = family.tensor_parallel(model)
        first = next(iter(self.layers.values()))
        shape = family.unit_shape(first)
        self.tracker = ImportanceTracker(self.layers, shape.heads, shape.kv_heads, shape.channels, shape.head_dim,
                                         decay=self.cfg.ema_decay, metric=self.cfg.metric, seed=self.seed,
                                         device=family.device(first))
        self.keep_heads, self.keep_channels = {}, {}
        self._resolve = ResolveCache(family.resolve)  # new layers: nothing resolved for them yet
        self._omitted_for: tuple[Any, list[OmittedSlice], dict] | None = None  # see _frozen
        self.selection = self._resolve(self.layers, {}, {}, self._shard)
        self.zero3 = any(is_zero3(p) for p in first.parameters())
        if self.zero3:
            from deepspeed import zero

            for layer in self.layers.values():
                for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                    for name in names:
                        for p in getattr(owner, name).parameters(recurse=False):
                            zero.register_external_parameter(owner, p)

    def attach(self, optimizer: Any) -> None:
        """Hook the ``freeze`` policy into the optimizer that will step this model (a new engine's, or one
        whose state a checkpoint load replaced: attach again then), and learn whether it needs every
        parameter's gradient at every backward (then the weight slices hand theirs over per micro-batch;
        they are still gathered once per step). Under ZeRO-1/2 the moment fragments the guard reads are
        (re)linked to the optimizer's current state tensors."""
        if self.guard is not None:
            self.guard.remove()
        self.guard = OmittedStateGuard(inner_optimizer(optimizer)) if self.cfg.optimizer_policy == "freeze" else None
        self.emit_every = 1 if gradient_every_backward(optimizer) else self.micro_batches
        link_optimizer_state(optimizer)  # after a checkpoint load the ZeRO-1/2 / bf16 fragments are stale

    @property
    def _shard(self):
        return None if self.tp is None else self.tp.shard

    def begin_step(self, step: int) -> float:
        """Choose this step's heads and channels; returns the omission rate."""
        start = time.perf_counter()
        rate = self.lors.rate(step)
        if rate == 0.0:
            self._dense(rate)
        elif step % self.cfg.reselect_every == 0 or rate != self.rate:
            if self.tp is not None:
                gather_tp_scores(self.tracker, self.tp)
            self._average_scores()
            shards = self.tp.size if self.tp is not None and self.cfg.tp_selection == "balanced" else 1
            heads, channels = select(_on_host(self.tracker), rate, self.cfg.granularity, num_shards=shards,
                                     head_omission_rate=rate if self.cfg.heads else 0.0,
                                     selection=self.cfg.selection, seed=self.seed, step=step)
            self.keep_heads, self.keep_channels = heads, channels if self.cfg.channels else {}
            resolutions = self._resolve.resolutions
            self.selection = self._resolve(self.layers, self.keep_heads, self.keep_channels, self._shard)
            self.selections += 1
            self.selection_changes += self._resolve.resolutions - resolutions
        self.rate = rate
        if self.guard is not None and (self.keep_heads or self.keep_channels):
            self.guard.arm(partial(self._frozen, self.selection))
        self.bookkeeping_s += time.perf_counter() - start
        return rate

    def _dense(self, rate: float) -> None:
        """A rate-0 step. LORS's rates never rise, so no later selection will read importance: no scores are
        averaged, selected from or recorded from here on (:meth:`omitting`, :meth:`end_step`), and the step
        costs what a dense one does. Entering it from a sparse step is one more selection, of every unit."""
        if self.keep_heads or self.keep_channels or self.rate != rate:
            resolutions = self._resolve.resolutions
            self.keep_heads, self.keep_channels = {}, {}
            self.selection = self._resolve(self.layers, {}, {}, self._shard)
            self.selections += 1
            self.selection_changes += self._resolve.resolutions - resolutions

    def _frozen(self, selection: Any) -> list[FrozenFragment]:
        """The guard's fragments for this step. The omitted slices and their plans are kept with the resolved
        selection (the same object while the kept units stay; a family that resolves nothing ahead, None,
        builds them every step)."""
        if selection is None or self._omitted_for is None or self._omitted_for[0] is not selection:
            self._omitted_for = (selection, self.omitted(), {})
        _, slices, plans = self._omitted_for
        return frozen_fragments(self.guard.optimizer, slices, plans)

    def _average_scores(self) -> None:
        if dist.is_initialized() and dist.get_world_size(self.dp_group) > 1:
            flat = self.tracker.flat()
            dist.all_reduce(flat, group=self.dp_group)
            self.tracker.set_flat(flat / dist.get_world_size(self.dp_group))

    def omitting(self):
        """Context for every forward + backward of the step: sliced layers, importance recorded in the same pass
        (none at rate 0, see :meth:`_dense`)."""
        tracker = self.tracker if self.rate > 0 else None
        return self.family.omit(self.layers, self.keep_heads, self.keep_channels, tracker, self._shard,
                                self.emit_every, not self.zero3, self.selection, self.micro_batches)

    def omitted(self) -> list[OmittedSlice]:
        """This step's omitted slices of the parameters this rank holds (local indices under TP)."""
        return self.family.omitted_slices(self.layers, self.keep_heads, self.keep_channels, self._shard,
                                          self.selection)

    def end_step(self) -> None:
        start = time.perf_counter()
        if self.rate > 0:
            self.tracker.update()
        if self.guard is not None:
            self.guard.disarm()
            self.bookkeeping_s += self.guard.seconds
            self.guard.seconds = 0.0
        self.bookkeeping_s += time.perf_counter() - start

    def widths(self) -> list[LayerWidth]:
        """What each layer of the whole model computed this step (all pipeline stages), for the FLOPs count."""
        local = self._local_widths()
        if self.pipe_group is None:
            return [local[i] for i in sorted(local)]
        parts: list[dict] = [{} for _ in range(dist.get_world_size(self.pipe_group))]
        dist.all_gather_object(parts, local, group=self.pipe_group)
        merged = {i: w for part in parts for i, w in part.items()}
        return [merged[i] for i in sorted(merged)]

    def _local_widths(self) -> dict[int, LayerWidth]:
        """Kept units per layer, whole model (under TP the selection is global: count it, not the block)."""
        widths = {}
        for index, layer in self.layers.items():
            shape = self.family.unit_shape(layer)
            q, kv, m = shape.heads, shape.kv_heads, shape.channels
            if index in self.keep_heads:
                q = len(self.keep_heads[index])
                kv = len(torch.unique(self.keep_heads[index] // shape.groups))
            if index in self.keep_channels:
                m = len(self.keep_channels[index])
            widths[index] = LayerWidth(q, kv, m)
        return widths

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "rate": self.rate,
                "keep_heads": self.keep_heads, "keep_channels": self.keep_channels}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.rate, self.keep_heads, self.keep_channels = state["rate"], state["keep_heads"], state["keep_channels"]
        self.selection = self._resolve(self.layers, self.keep_heads, self.keep_channels, self._shard)


class NoSAT:
    """The dense run's stand-in for :class:`SATController`: the training step reads the same either way."""

    rate = 0.0
    bookkeeping_s = 0.0
    selections = selection_changes = 0

    def attach(self, optimizer: Any) -> None:
        pass

    def rebind(self, model) -> None:
        pass

    def begin_step(self, step: int) -> float:
        return 0.0

    def omitting(self):
        return nullcontext()

    def end_step(self) -> None:
        pass

    def widths(self) -> None:
        return None

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass

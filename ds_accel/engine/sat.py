"""SAT inside a DeepSpeed engine: the plumbing around the pure ``ds_accel.sat`` functions.

What lives here and nowhere else:
- importance scores are averaged over the data-parallel group before every selection, so all ranks
  omit the same heads and channels;
- under ZeRO-3 the sliced forward reads ``q_proj.weight`` etc. without calling those modules, so the
  weights are registered as external parameters of the attention / MLP module
  (``deepspeed.zero.register_external_parameter``): DeepSpeed then gathers them for that module's
  forward and backward;
- omitted rows must not move in the optimizer step (AdamW would decay them and apply momentum even
  at zero gradient). Their values are saved before ``engine.step()`` and written back after it, in
  every copy DeepSpeed keeps of them on this rank: the model weight (full under ZeRO 0-2, this rank's
  shard under ZeRO-3), the fp32 master fragment and the Adam moments (``_hp_mapping`` fragments under
  ZeRO-1/2 and bf16, ``safe_get_local_*`` partitions under ZeRO-3). The per-tensor Adam step count
  (bias correction) still advances: it is one number per flat group, shared with the kept rows.

Tensor parallelism (AutoTP, see ``ds_accel.parallel.tensor``): a rank holds a block of every layer's
heads and channels. It computes the kept units of its block only and records their importance; the
scores are assembled over the TP group (each unit's from the rank that holds it, so they equal a
single process's) before the data-parallel average. Selection is global, by default balanced over
the TP blocks (``sat.tp_selection``); omitted rows are frozen in this rank's block of each
split parameter.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist

from ..config import SATConfig
from ..flops import LayerWidth
from ..parallel.tensor import TensorParallel, tensor_parallel
from ..sat import LORS, ImportanceTracker, decoder_layers, omit, omitted_slices, select
from ..sat.importance import CHANNELS, HEADS
from ..sat.omit import HeadSelection
from ..sat.optim_guard import OmittedSlice
from .params import is_zero3

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _flat_positions(s: OmittedSlice) -> torch.Tensor:
    """Indices of the omitted elements in the flattened parameter."""
    shape = getattr(s.param, "ds_shape", s.param.shape)  # a ZeRO-3 weight's own tensor is a 1-D placeholder
    if len(shape) == 1:
        return s.index
    rows, cols = shape
    if s.dim == 0:
        return (s.index[:, None] * cols + torch.arange(cols, device=s.index.device)).flatten()
    return (torch.arange(rows, device=s.index.device)[:, None] * cols + s.index).flatten()


def _local_copies(p: torch.nn.Parameter, optimizer) -> list[tuple[int, torch.Tensor]]:
    """(flat offset, 1-D view) of every copy of ``p`` this rank holds: model weight, master, moments."""
    if is_zero3(p):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        offset = dist.get_rank() * p.ds_tensor.numel() if dist.is_initialized() else 0
        views = [p.ds_tensor.view(-1), safe_get_local_fp32_param(p)]
        state = p._z3_optimizer.optimizer.state
        if state:
            views += [safe_get_local_optimizer_state(p, key) for key in _MOMENTS]
        return [(offset, v.view(-1)) for v in views if v is not None]
    copies = [(0, p.data.view(-1))]
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2 and bf16: this rank's fragment of the flat fp32 partition
        start = mapping.lp_fragment_address.start
        copies.append((start, mapping.hp_fragment.view(-1)))
        copies += [(start, v.view(-1)) for v in (mapping.optim_fragment or {}).values()]
    elif p in getattr(optimizer, "state", {}):  # plain torch optimizer (ZeRO-0, fp32)
        copies += [(0, v.view(-1)) for k, v in optimizer.state[p].items() if k in _MOMENTS]
    return copies


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


@contextmanager
def frozen_omitted(engine, slices: list[OmittedSlice]) -> Iterator[None]:
    """Around ``engine.step()``: every local copy of the omitted elements comes out bit-identical.

    A copy holding the whole parameter (ZeRO-0, or the model weight under ZeRO-1/2) saves its omitted
    rows / columns with ``index_select``; a flat fragment of a partition (master and moments under
    ZeRO-1/2/3) the omitted elements that fall inside it, by flat position.
    """
    restore = []
    with torch.no_grad():
        for s in slices:
            shape = getattr(s.param, "ds_shape", s.param.shape)
            positions = None
            for offset, view in _local_copies(s.param, engine.optimizer):
                if offset == 0 and view.numel() == shape.numel():
                    whole = view.view(shape)
                    restore.append(partial(whole.index_copy_, s.dim, s.index, whole.index_select(s.dim, s.index)))
                    continue
                positions = _flat_positions(s) if positions is None else positions
                local = positions - offset
                local = local[(local >= 0) & (local < view.numel())]
                if local.numel():
                    restore.append(partial(view.index_put_, (local,), view[local]))
    yield
    with torch.no_grad():
        for write_back in restore:  # the views alias DeepSpeed's buffers, updated in place by the step
            write_back()


class SATController:
    """Per-step SAT for one engine: rate from LORS, DP-averaged selection, sliced step, frozen omitted state.

    ``cfg.tp_selection`` (tensor parallelism only): "balanced" selects the top units within each TP
    rank's block, the same number on every rank; "global" the top-k over the layer. Each rank computes
    only its kept units and the row-parallel all-reduce waits for the slowest, so a step takes as long
    as the rank with the most kept units: a global top-k can keep all of a layer's units on one rank
    (at rate 0.5 and tp=2 the other rank idles and the layer saves no time). The price of "balanced"
    is a per-block quota on which units survive; the rate, and the FLOPs saved, are the same."""

    def __init__(self, cfg: SATConfig, model, total_steps: int, seed: int, dp_group=None, pipe_group=None):
        """``model``: the HF model, or a pipeline stage's {layer index: block}; ``dp_group``: the ranks that
        must select alike (default: all); ``pipe_group``: the stages whose layers make up the model."""
        self.cfg, self.seed = cfg, seed
        self.dp_group, self.pipe_group = dp_group, pipe_group
        self.lors = LORS(total_steps, cfg.omission_rate, cfg.stage1_fraction, cfg.rungs, cfg.schedule)
        self.rate = 0.0
        self.rebind(model)

    def rebind(self, model) -> None:
        """A new model (a V-cycle level): new shapes, so importance starts afresh."""
        self.model = model
        self.layers = decoder_layers(model)
        self.tp = tensor_parallel(model)
        first = next(iter(self.layers.values()))
        config = first.self_attn.config  # the full shape: under AutoTP the layers hold blocks of it
        self.tracker = ImportanceTracker(self.layers, config.num_attention_heads, config.num_key_value_heads,
                                         config.intermediate_size, first.self_attn.head_dim,
                                         decay=self.cfg.ema_decay, metric=self.cfg.metric, seed=self.seed,
                                         device=first.mlp.down_proj.weight.device)
        self.keep_heads, self.keep_channels = {}, {}
        if is_zero3(first.mlp.down_proj.weight):
            from deepspeed import zero

            for layer in self.layers.values():
                for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                    for name in names:
                        for p in getattr(owner, name).parameters(recurse=False):
                            zero.register_external_parameter(owner, p)

    def begin_step(self, step: int) -> float:
        """Choose this step's heads and channels; returns the omission rate."""
        rate = self.lors.rate(step)
        if step % self.cfg.reselect_every == 0 or rate != self.rate:
            if self.tp is not None:
                gather_tp_scores(self.tracker, self.tp)
            self._average_scores()
            shards = self.tp.size if self.tp is not None and self.cfg.tp_selection == "balanced" else 1
            heads, channels = select(self.tracker, rate, self.cfg.granularity, num_shards=shards,
                                     head_omission_rate=rate if self.cfg.heads else 0.0)
            self.keep_heads, self.keep_channels = heads, channels if self.cfg.channels else {}
        self.rate = rate
        return rate

    def _average_scores(self) -> None:
        if dist.is_initialized() and dist.get_world_size(self.dp_group) > 1:
            flat = self.tracker.flat()
            dist.all_reduce(flat, group=self.dp_group)
            self.tracker.set_flat(flat / dist.get_world_size(self.dp_group))

    def omitting(self):
        """Context for forward + backward: sliced layers, importance recorded in the same pass."""
        return omit(self.model, self.keep_heads, self.keep_channels, self.tracker,
                    shard=None if self.tp is None else self.tp.shard)

    def omitted(self) -> list[OmittedSlice]:
        """This step's omitted slices of the parameters this rank holds (local indices under TP)."""
        return omitted_slices(self.layers, self.keep_heads, self.keep_channels,
                              None if self.tp is None else self.tp.shard)

    def guard_optimizer(self, engine):
        return frozen_omitted(engine, self.omitted())

    def end_step(self) -> None:
        self.tracker.update()

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
        widths = {}
        for index, layer in self.layers.items():
            attn, config = layer.self_attn, layer.self_attn.config
            q, kv = config.num_attention_heads, config.num_key_value_heads
            if index in self.keep_heads:
                sel = HeadSelection.of(attn, self.keep_heads[index])
                q, kv = len(sel.q_heads), len(sel.kv_heads)
            m = len(self.keep_channels[index]) if index in self.keep_channels else config.intermediate_size
            widths[index] = LayerWidth(q, kv, m)
        return widths

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "rate": self.rate,
                "keep_heads": self.keep_heads, "keep_channels": self.keep_channels}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.rate, self.keep_heads, self.keep_channels = state["rate"], state["keep_heads"], state["keep_channels"]

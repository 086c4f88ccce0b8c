"""Level transitions between two live DeepSpeed engines, one parameter at a time.

The pure operators (``ds_accel.multilevel.operators``) act on one full tensor; this module feeds
them from sharded engines: it gathers the source parameter(s) in fp32 (``full_param``), applies
the operator, writes the result into the target engine's master and model copies
(``set_full_param``) and drops the gathered tensors before the next parameter. The extra memory of
a transition is therefore a few full parameters (for depth coalescing: the factor's source layers'
copies of one parameter), never a whole model.

The large model's weights that interpolation needs later are kept as each rank's 1/world shard of
every flattened fp32 parameter (``keep_shards``), on CPU: the cluster as a whole holds one copy.

Under pipeline parallelism a stage holds only its own layers, and the levels' stages hold different
layers (depth coalescing halves the layer count; each level's pipeline re-partitions its layers over
the same stages). :class:`LevelParams` gives every rank the same view of a level's parameters by HF
name: a read is the owning stage's ``full_param`` broadcast to all ranks, a write lands on the ranks
that hold the parameter (both stages of a tied embedding/head). Every rank walks every name in the
same order, so the collectives match, and one parameter is alive at a time as before.

``multilevel.optimizer_policy: transfer`` maps Adam's moments along with the weights, parameter by
parameter through the same reads and writes (``LevelParams.read/write`` with a moment key: DeepSpeed's
``safe_get/set_full_optimizer_state`` under ZeRO-1/2/3 and bf16, the torch optimizer's own state where it
steps the parameter itself), so the memory bound is the weights'. The new level's optimizer has no
state before its first step; ``init_adam_state`` creates it (zeros, at the old optimizer's step count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
from transformers import LlamaConfig, LlamaForCausalLM

from .. import runtime
from ..ds_private import link_optimizer_state, zero3_flat_groups
from ..multilevel.operators import (
    LevelMap,
    coalesce_grad,
    coalesce_param,
    decoalesce_grad,
    decoalesce_param,
    interpolate_state_dict,
    large_layer_source,
    small_layer_sources,
)
from ..parallel.tensor import gather_tp, local_tp, tp_split
from .params import full_param, set_full_param, shard_of, unshard
from .sat import inner_optimizer

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's first and second moment, as torch names them

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def _with_layer(name: str, layer: int) -> str:
    m = _LAYER.match(name)
    return f"{m.group(1)}{layer}{m.group(3)}" if m else name


def _layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(2)) if m else None


def named_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by HF name (tied weights appear once, under the embedding's name)."""
    return dict(model.named_parameters())


def full_moment(p: torch.nn.Parameter, key: str, optimizer: Any) -> torch.Tensor:
    """The whole Adam moment ``key`` of ``p`` in fp32 on every rank (collective under ZeRO and TP)."""
    inner = inner_optimizer(optimizer)
    local = inner.state[p][key] if p in inner.state else safe_get_full_optimizer_state(p, key)
    if local is None:
        raise RuntimeError(f"optimizer_policy transfer: {type(optimizer).__name__} keeps {key} of a parameter where "
                           "neither torch's state nor DeepSpeed's safe_get_full_optimizer_state reaches it (ZeRO-0 "
                           "with bf16 wraps AdamW in FP16_UnfusedOptimizer); use ZeRO-1, 2 or 3 with bf16")
    local = local.detach().float().clone()
    split = tp_split(p)
    return local if split is None else gather_tp(split, local)


def set_full_moment(p: torch.nn.Parameter, value: torch.Tensor, key: str, optimizer: Any) -> None:
    """Write the whole moment ``value`` where this rank keeps its part of it (its TP block, its ZeRO fragment)."""
    split = tp_split(p)
    if split is not None:
        value = local_tp(split, value)
    inner = inner_optimizer(optimizer)
    if p in inner.state:  # ZeRO-0 fp32: torch steps the parameter itself
        inner.state[p][key].copy_(value)
    else:
        safe_set_full_optimizer_state(p, value.float(), key)


def adam_step(optimizer: Any) -> int:
    """The step count of an optimizer's Adam state (the same for every parameter: all step together)."""
    steps = [int(state["step"]) for state in inner_optimizer(optimizer).state.values() if "step" in state]
    return max(steps, default=0)


def init_adam_state(optimizer: Any, step: int) -> None:
    """Create the AdamW state of an engine that has not stepped yet: zero moments at step count ``step``.

    torch creates the state at the first step, and DeepSpeed's ZeRO-1/2 and bf16 optimizers link each
    parameter's fragment of it then (its ``safe_set_full_optimizer_state`` needs that link); the moments
    of a transition must be in place before that step. The state is what torch's AdamW would create
    (its ``step`` hosted on the device when fused or capturable, else on the CPU). DeepSpeed private
    API, as no public one creates optimizer state before a step: under ZeRO-3 the torch optimizer's
    parameters are the flat fp32 sub-groups ``fp32_partitioned_groups_flat`` (set into its param groups
    only during a step); ZeRO-1/2 and bf16 fragments are linked by ``ds_private.link_optimizer_state``.
    """
    inner = inner_optimizer(optimizer)
    flats = zero3_flat_groups(optimizer)
    if flats is None:
        flats = [p for group in inner.param_groups for p in group["params"]]
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for flat in flats:
        inner.state[flat] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    link_optimizer_state(optimizer)


@dataclass
class LevelParams:
    """One level's parameters by HF name, the same on every rank (see the module docstring).

    ``local``: the parameters this rank holds; ``shapes``: every name of the level, in HF order;
    ``owner``: for a pipeline, the lowest global rank holding each name (the broadcast source);
    None when every rank holds every name (ZeRO and TP gather inside ``full_param``).
    """

    local: dict[str, torch.nn.Parameter]
    shapes: dict[str, torch.Size]
    owner: dict[str, int] | None = None
    optimizer: Any = None  # the engine's optimizer, for reading and writing Adam's moments

    @classmethod
    def of(cls, model: torch.nn.Module, config: LlamaConfig | None = None, optimizer: Any = None) -> LevelParams:
        """A HF model, or (with its ``config``) this rank's pipeline stage of one; with the engine's
        ``optimizer`` its Adam moments can be read and written too."""
        from deepspeed.pipe import PipelineModule

        if optimizer is not None:
            link_optimizer_state(optimizer)
        if not isinstance(model, PipelineModule):
            local = named_params(model)
            return cls(local, {n: getattr(p, "ds_shape", p.shape) for n, p in local.items()}, None, optimizer)
        from ..parallel.pipeline import local_named_parameters

        local = dict(local_named_parameters(model))
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
        held: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(held, sorted(local))
        owner = {}
        for rank, names in enumerate(held):
            for name in names:
                owner.setdefault(name, rank)
        if owner.keys() != shapes.keys():
            raise RuntimeError(f"LevelParams: the stages hold {sorted(owner)}, the config has {sorted(shapes)}")
        return cls(local, shapes, owner, optimizer)

    def read(self, name: str, moment: str | None = None) -> torch.Tensor:
        """The full fp32 parameter, or its Adam ``moment`` (one of MOMENTS), on every rank (collective)."""
        get = full_param if moment is None else (lambda p: full_moment(p, moment, self.optimizer))
        if self.owner is None:
            return get(self.local[name])
        p = self.local.get(name)
        value = get(p).to(runtime.device()) if p is not None else \
            torch.empty(self.shapes[name], device=runtime.device())
        dist.broadcast(value, src=self.owner[name])
        return value

    def write(self, name: str, value: torch.Tensor, moment: str | None = None) -> None:
        """Set the parameter, or its Adam ``moment``, where this rank holds it (collective within its ZeRO group)."""
        if name not in self.local:
            return
        if moment is None:
            set_full_param(self.local[name], value)
        else:
            set_full_moment(self.local[name], value, moment, self.optimizer)


def _level(x: torch.nn.Module | LevelParams) -> LevelParams:
    return x if isinstance(x, LevelParams) else LevelParams.of(x)


def keep_shards(model: torch.nn.Module | LevelParams) -> dict[str, torch.Tensor]:
    """This rank's shard of every fp32 parameter, on CPU, for interpolation on the way back up."""
    rank, world, params = runtime.rank(), runtime.world_size(), _level(model)
    return {name: shard_of(params.read(name), rank, world).cpu() for name in params.shapes}


def restore_shard(shard: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return unshard(shard.to(runtime.device()), shape)


def _mapped(src: LevelParams, names: list[str], op: Callable, moment: str | None) -> tuple[torch.Tensor, int]:
    """The mean over ``names`` (a depth group) of ``op`` on each source tensor, read one at a time; the
    second moment goes through ``op`` as its root (see ``coalesce_moments``). Returns the result and the
    most elements alive at once."""
    total = None
    for n in names:
        gathered = src.read(n, moment)
        part = op(n, gathered.sqrt() if moment == "exp_avg_sq" else gathered)
        peak = gathered.numel() * len(names)
        total = part if total is None else total + part
    total = total / len(names)
    return (total.square() if moment == "exp_avg_sq" else total), peak


@torch.no_grad()
def coalesce_into(large: torch.nn.Module | LevelParams, small: torch.nn.Module | LevelParams,
                  lmap: LevelMap, moments: bool = False) -> int:
    """small <- coalesce(large); with ``moments`` Adam's moments too (``coalesce_grad`` on m and sqrt(v)),
    the small optimizer's state created at the large one's step count. Returns the largest number of
    elements gathered at once."""
    src, dst = _level(large), _level(small)
    if moments:
        init_adam_state(dst.optimizer, adam_step(src.optimizer))
    sources = small_layer_sources(lmap)
    peak = 0
    for name in dst.shapes:
        layer = _layer_of(name)
        names = [name] if layer is None else [_with_layer(name, a) for a in sources[layer]]
        ops = [(None, lambda n, t: coalesce_param(n, t, lmap))]
        if moments:
            ops += [(key, lambda n, t: coalesce_grad(n, t, lmap)) for key in MOMENTS]
        for moment, op in ops:
            value, gathered = _mapped(src, names, op, moment)
            peak = max(peak, gathered)
            dst.write(name, value, moment)
    return peak


@torch.no_grad()
def decoalesce_into(small: torch.nn.Module | LevelParams, large: torch.nn.Module | LevelParams, lmap: LevelMap,
                    kept: dict[str, torch.Tensor], alpha: float, moments: bool = False) -> int:
    """large <- (1 - alpha) * kept + alpha * decoalesce(small); with ``moments`` Adam's moments become the
    decoalesced small ones (``decoalesce_grad``, not interpolated: the large level's moments from before
    the small stage are not kept). Returns the peak gathered elements."""
    src, dst = _level(small), _level(large)
    if moments:
        init_adam_state(dst.optimizer, adam_step(src.optimizer))
    peak = 0
    for name in dst.shapes:
        layer = _layer_of(name)
        small_name = name if layer is None else _with_layer(name, large_layer_source(lmap, layer))
        gathered = src.read(small_name)
        widened = decoalesce_param(name, gathered, lmap)
        theta_large = restore_shard(kept[name], widened.shape)
        peak = max(peak, gathered.numel() + 2 * widened.numel())
        blended = interpolate_state_dict({name: theta_large}, {name: widened}, alpha)[name]
        dst.write(name, blended)
        if moments:
            for key in MOMENTS:
                value, gathered = _mapped(src, [small_name], lambda n, t: decoalesce_grad(name, t, lmap), key)
                peak = max(peak, gathered + value.numel())
                dst.write(name, value, key)
    return peak

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from .. import runtime
from ..multilevel.operators import (
    LevelMap,
    coalesce_param,
    decoalesce_param,
    interpolate_state_dict,
    large_layer_source,
    small_layer_sources,
)
from .params import full_param, set_full_param, shard_of, unshard

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

    @classmethod
    def of(cls, model: torch.nn.Module, config: LlamaConfig | None = None) -> LevelParams:
        """A HF model, or (with its ``config``) this rank's pipeline stage of one."""
        from deepspeed.pipe import PipelineModule

        if not isinstance(model, PipelineModule):
            local = named_params(model)
            return cls(local, {n: getattr(p, "ds_shape", p.shape) for n, p in local.items()})
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
        return cls(local, shapes, owner)

    def read(self, name: str) -> torch.Tensor:
        """The full fp32 parameter on every rank (collective)."""
        if self.owner is None:
            return full_param(self.local[name])
        p = self.local.get(name)
        value = full_param(p).to(runtime.device()) if p is not None else \
            torch.empty(self.shapes[name], device=runtime.device())
        dist.broadcast(value, src=self.owner[name])
        return value

    def write(self, name: str, value: torch.Tensor) -> None:
        """Set the parameter where this rank holds it (collective within its ZeRO group)."""
        if name in self.local:
            set_full_param(self.local[name], value)


def _level(x: torch.nn.Module | LevelParams) -> LevelParams:
    return x if isinstance(x, LevelParams) else LevelParams.of(x)


def keep_shards(model: torch.nn.Module | LevelParams) -> dict[str, torch.Tensor]:
    """This rank's shard of every fp32 parameter, on CPU, for interpolation on the way back up."""
    rank, world, params = runtime.rank(), runtime.world_size(), _level(model)
    return {name: shard_of(params.read(name), rank, world).cpu() for name in params.shapes}


def restore_shard(shard: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return unshard(shard.to(runtime.device()), shape)


@torch.no_grad()
def coalesce_into(large: torch.nn.Module | LevelParams, small: torch.nn.Module | LevelParams,
                  lmap: LevelMap) -> int:
    """small <- coalesce(large); returns the largest number of elements gathered at once."""
    src, dst = _level(large), _level(small)
    sources = small_layer_sources(lmap)
    peak = 0
    for name in dst.shapes:
        layer = _layer_of(name)
        names = [name] if layer is None else [_with_layer(name, a) for a in sources[layer]]
        total = None
        for n in names:
            gathered = src.read(n)
            peak = max(peak, gathered.numel() * len(names))
            part = coalesce_param(n, gathered, lmap)
            total = part if total is None else total + part
        dst.write(name, total / len(names))
    return peak


@torch.no_grad()
def decoalesce_into(small: torch.nn.Module | LevelParams, large: torch.nn.Module | LevelParams, lmap: LevelMap,
                    kept: dict[str, torch.Tensor], alpha: float) -> int:
    """large <- (1 - alpha) * kept + alpha * decoalesce(small); returns the peak gathered elements."""
    src, dst = _level(small), _level(large)
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
    return peak

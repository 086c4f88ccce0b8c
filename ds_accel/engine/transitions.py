"""Level transitions between two live DeepSpeed engines, one parameter at a time.

The pure operators (``ds_accel.multilevel.operators``) act on one full tensor; this module feeds
them from sharded engines: it gathers the source parameter(s) in fp32 (``full_param``), applies
the operator, writes the result into the target engine's master and model copies
(``set_full_param``) and drops the gathered tensors before the next parameter. The extra memory of
a transition is therefore a few full parameters (for depth coalescing: the factor's source layers'
copies of one parameter), never a whole model.

The large model's weights that interpolation needs later are kept as each rank's 1/world shard of
every flattened fp32 parameter (``keep_shards``), on CPU: the cluster as a whole holds one copy.
"""

from __future__ import annotations

import re

import torch

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


def keep_shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shard of every fp32 parameter, on CPU, for interpolation on the way back up."""
    rank, world = runtime.rank(), runtime.world_size()
    return {name: shard_of(full_param(p), rank, world).cpu() for name, p in named_params(model).items()}


def restore_shard(shard: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return unshard(shard.to(runtime.device()), shape)


@torch.no_grad()
def coalesce_into(large: torch.nn.Module, small: torch.nn.Module, lmap: LevelMap) -> int:
    """small <- coalesce(large); returns the largest number of elements gathered at once."""
    src = named_params(large)
    sources = small_layer_sources(lmap)
    peak = 0
    for name, p in named_params(small).items():
        layer = _layer_of(name)
        names = [name] if layer is None else [_with_layer(name, a) for a in sources[layer]]
        total = None
        for n in names:
            gathered = full_param(src[n])
            peak = max(peak, gathered.numel() * len(names))
            part = coalesce_param(n, gathered, lmap)
            total = part if total is None else total + part
        set_full_param(p, total / len(names))
    return peak


@torch.no_grad()
def decoalesce_into(small: torch.nn.Module, large: torch.nn.Module, lmap: LevelMap,
                    kept: dict[str, torch.Tensor], alpha: float) -> int:
    """large <- (1 - alpha) * kept + alpha * decoalesce(small); returns the peak gathered elements."""
    src = named_params(small)
    peak = 0
    for name, p in named_params(large).items():
        layer = _layer_of(name)
        small_name = name if layer is None else _with_layer(name, large_layer_source(lmap, layer))
        gathered = full_param(src[small_name])
        widened = decoalesce_param(name, gathered, lmap)
        theta_large = restore_shard(kept[name], widened.shape)
        peak = max(peak, gathered.numel() + 2 * widened.numel())
        blended = interpolate_state_dict({name: theta_large}, {name: widened}, alpha)[name]
        set_full_param(p, blended)
    return peak

"""A Megatron model's parameters by HF Llama name: the view level transitions, export and conversion share.

:class:`MegatronParams` is a :class:`ds_accel.engine.transitions.LevelParams` whose names are the HF
Llama names and whose tensors live in Megatron's fused, TP-sharded parameters (``layout``). A read
is this rank's block (``engine.params.full_param``: the fp32 master where DeepSpeed keeps one,
gathered over ZeRO) all-gathered over the TP group into the whole HF tensor; a write puts this
rank's block of the whole value into its rows / columns of the Megatron parameter (master and
model copy), leaving the other rows of a fused parameter as they were. Both are collective: every
rank walks the same names in the same order, one parameter at a time, so the V-cycle's operators
(``coalesce_into`` / ``decoalesce_into`` / ``keep_shards``) run on a Megatron model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig

from ..engine.params import full_param, set_full_param
from ..engine.transitions import LevelParams
from .layout import Placement, hf_names, placement
from .parallel import all_gather_tp, tp_rank, tp_world


def unwrap_gpt(model: Any) -> torch.nn.Module:
    """The GPTModel inside a DeepSpeed engine (``.module``) and/or a :class:`MegatronCausalLM` (``.gpt``)."""
    while not hasattr(model, "decoder"):
        if hasattr(model, "gpt"):
            model = model.gpt
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"no Megatron GPTModel in {type(model).__name__}")
    return model


def _weights_only(moment: str | None) -> None:
    if moment is not None:
        raise NotImplementedError("MegatronParams: Adam moments are not mapped across levels on the Megatron backend "
                                  "(multilevel.optimizer_policy: fresh)")


@dataclass
class MegatronParams(LevelParams):
    """See the module docstring; ``local`` maps each HF name to the Megatron parameter holding it."""

    config: LlamaConfig | None = None
    placements: dict[str, Placement] | None = None

    @classmethod
    def of(cls, model: Any, config: LlamaConfig | None = None) -> MegatronParams:
        if config is None:
            raise ValueError("MegatronParams.of: pass the model's HF LlamaConfig")
        gpt, tp = unwrap_gpt(model), tp_world()
        names = hf_names(config)
        placements = {name: placement(name, config, tp) for name in names}
        with torch.device("meta"):
            from transformers import LlamaForCausalLM

            shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
        local = {name: gpt.get_parameter(placements[name].megatron) for name in names}
        return cls(local=local, shapes=shapes, config=config, placements=placements)

    def read(self, name: str, moment: str | None = None) -> torch.Tensor:
        """The whole HF tensor in fp32 on every rank (collective over ZeRO and TP)."""
        _weights_only(moment)
        return self.assemble(name, full_param(self.local[name]))

    def assemble(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The HF tensor ``name`` from a tensor shaped like its local Megatron parameter (the value, a
        gradient, an optimizer moment) on every TP rank (collective over the TP group)."""
        where = self.placements[name]
        if where.dim is None:
            return local
        block = local.index_select(where.dim, where.local.to(local.device))
        return torch.cat(all_gather_tp(block), dim=where.dim)

    def write(self, name: str, value: torch.Tensor, moment: str | None = None) -> None:
        """Set this rank's block of the HF tensor ``value`` (the same on every rank); collective over ZeRO."""
        _weights_only(moment)
        where, p = self.placements[name], self.local[name]
        if where.dim is None:
            set_full_param(p, value)
            return
        n = where.local.numel()
        current = full_param(p)
        block = value.to(current.device).narrow(where.dim, tp_rank() * n, n)
        current.index_copy_(where.dim, where.local.to(current.device), block.to(current.dtype))
        set_full_param(p, current)


__all__ = ["MegatronParams", "unwrap_gpt"]

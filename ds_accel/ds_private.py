"""Every use of a DeepSpeed private attribute in ds_accel, each with why no public API serves.

Kept in one module so that a DeepSpeed upgrade that renames one breaks here, in
``tests/test_ds_private.py``, with a message naming it, rather than deep inside a training step.
Tested against deepspeed 0.19.x.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class LocalFragment:
    """The part of one parameter that this rank's optimizer steps: elements ``[start, start + numel)``
    of the flattened parameter, as a view ``master`` into the flat fp32 tensor the inner torch optimizer
    steps (``flat``), and the views of its per-element optimizer state (Adam's moments) once they exist."""

    start: int
    numel: int
    master: Tensor
    state: tuple[Tensor, ...]


def zero3_fragment(p: torch.nn.Parameter, moments: tuple[str, ...]) -> LocalFragment | None:
    """This rank's ZeRO-3 partition of ``p`` in the optimizer's flat fp32 sub-group.

    Private: ``p._z3_optimizer``, ``grad_position``, ``get_param_id``, ``fp32_partitioned_groups_flat``,
    ``optimizer.state``. The public ``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state`` return
    the same views but synchronise the reduce stream on every call (a host sync per parameter in the
    optimizer step), and give no way to tell which flat sub-group a view belongs to.
    """
    z3 = p._z3_optimizer
    group, offset, size = z3.grad_position[z3.get_param_id(p)]
    start = dist.get_rank(group=p.ds_process_group) * p.ds_tensor.ds_numel if dist.is_initialized() else 0
    numel = min(size, p.ds_numel - start)
    if numel <= 0:
        return None
    flat = z3.fp32_partitioned_groups_flat[group]
    state = z3.optimizer.state.get(flat, {})
    views = tuple(state[key].narrow(0, offset, numel) for key in moments if key in state)
    return LocalFragment(start, numel, flat.narrow(0, offset, numel), views)


def has_hp_mapping(p: torch.nn.Parameter) -> bool:
    """Whether a ZeRO-1/2 (or bf16) optimizer manages ``p`` through a fragment mapping (private
    ``_hp_mapping``; None on a rank whose partition holds none of ``p``)."""
    return hasattr(p, "_hp_mapping")


def zero3_flat_groups(optimizer: Any) -> list[Tensor] | None:
    """The flat fp32 sub-groups a ZeRO-3 optimizer steps (private ``fp32_partitioned_groups_flat``: they sit
    in the torch optimizer's param groups only during its step, so no public API lists them); None for
    other optimizers."""
    return getattr(optimizer, "fp32_partitioned_groups_flat", None)


def hp_fragment(p: torch.nn.Parameter, moments: tuple[str, ...]) -> LocalFragment | None:
    """This rank's fragment of ``p`` in the fp32 partition of ZeRO-1/2 (and of the bf16 optimizer).

    Private: ``p._hp_mapping`` (``hp_fragment``, ``lp_fragment_address``, ``optim_fragment``). The
    public ``safe_get_local_fp32_param`` returns the fragment but not where it sits in the parameter,
    which the omitted rows must be located by. None when the parameter has no such mapping (ZeRO-0 fp32:
    the optimizer steps the parameter itself) or this rank holds none of it.
    """
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    optim = mapping.optim_fragment or {}
    return LocalFragment(address.start, address.numel, mapping.hp_fragment.view(-1),
                         tuple(optim[key].view(-1) for key in moments if key in optim))


def link_optimizer_state(optimizer: Any) -> None:
    """Link every parameter's moment fragments (``_hp_mapping.optim_fragment``) to the optimizer's current
    state tensors: ZeRO-1/2 and the bf16 optimizer (ZeRO-0 in bf16); other optimizers need nothing.

    DeepSpeed 0.19 links them once, after its first optimizer step, and never again: ZeRO-1/2 steps its
    parameter groups one at a time and links after the first group's step, so every later group (ours:
    the undecayed norms) keeps empty fragments and ``safe_get_full_optimizer_state`` raises for them; a
    checkpoint load replaces the state tensors, and state created before the first step (a V-cycle
    level's transferred moments) is not linked at all. Private: ``bit16_groups``,
    ``single_partition_of_fp32_groups``, ``_hp_optimizer_states_linked``,
    ``_lazy_init_hp_params_optimizer_state``; the linking function itself is DeepSpeed's
    (``deepspeed.utils.mixed_precision_linkage``).
    """
    state = getattr(getattr(optimizer, "optimizer", None), "state", None)
    if not state:  # nothing to link yet (linking now would stop DeepSpeed linking after its first step)
        return
    if hasattr(optimizer, "bit16_groups"):
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for params, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
            if flat in state:
                lazy_init_hp_params_optimizer_state(params, flat, state)
    elif hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def gradient_every_backward(optimizer: Any) -> bool:
    """Whether a DeepSpeed optimizer (or anything wrapping one) takes each parameter's gradient in a hook
    at every backward: ZeRO-2 (gradient partitioning), ``overlap_comm``, the fp32 gradient-accumulation
    attribute, bf16 ``immediate_grad_update``; ZeRO-3 always. Such an engine needs a gradient for every
    parameter the backward reached (a hook that finds ``grad`` None fails), so SAT's weight slices must
    hand their gradient over at each micro-batch instead of once per step.

    Private: these flags are attributes of DeepSpeed's optimizer objects, not config getters; the engine's
    public getters (``zero_optimization_partition_gradients`` ...) need the engine, which a
    ``transformers.Trainer`` callback does not get.
    """
    while optimizer is not None:
        flags = ("partition_gradients", "overlap_comm", "use_grad_accum_attribute", "immediate_grad_update")
        if any(getattr(optimizer, flag, False) for flag in flags) or hasattr(optimizer, "fp32_partitioned_groups_flat"):
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False


def autotp_layer(p: torch.nn.Parameter) -> Any:
    """The AutoTP layer that split ``p``, or None.

    Private: AutoTP binds the layer's ``gather_params`` method to each parameter it splits and this is
    the only link from a parameter to its layer (which holds ``tp_index``, ``mp_group``,
    ``tp_world_size``); DeepSpeed has no public "which TP block is this" query.
    """
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    layer = getattr(getattr(p, "gather_params", None), "__self__", None)
    meta = getattr(p, DS_AUTOTP_UC_META, None)
    if layer is None and meta is not None and not meta["replicated"] and meta["partition_dim"] is not None:
        raise RuntimeError("ds_private.autotp_layer: this DeepSpeed splits a parameter for AutoTP but no longer binds "
                           "its layer's gather_params to it; ds_accel's tensor-parallel support needs updating")
    return layer


def pipeline_local_specs(pipe: Any) -> tuple[list[Any], range]:
    """A PipelineModule's layer specs and the range of them this stage built.

    Private: ``_layer_specs``, ``_local_start``, ``_local_stop``, ``_num_layers``. PipelineModule's
    public surface gives the built modules but not which global layer index each one is, which the
    HF names (and so level transitions, export and SAT's per-layer scores) need.
    """
    return pipe._layer_specs, range(pipe._local_start, pipe._local_stop)


def skip_shm_op_build() -> None:
    """Skip the JIT build of DeepSpeed's shared-memory all-reduce op on CPU.

    Private: ``deepspeed.comm.torch.build_shm_op``. There is no switch; the build costs ~20 s per fresh
    machine (a C++ compile) and only speeds up large CPU all-reduces. ``import deepspeed.comm.torch``
    binds the name to the ``torch`` package, hence importlib.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(module, "build_shm_op"):
        raise AttributeError("deepspeed.comm.torch.build_shm_op")
    module.build_shm_op = lambda: None


__all__ = ["LocalFragment", "autotp_layer", "gradient_every_backward", "has_hp_mapping", "hp_fragment",
           "link_optimizer_state", "pipeline_local_specs", "skip_shm_op_build", "zero3_flat_groups", "zero3_fragment"]

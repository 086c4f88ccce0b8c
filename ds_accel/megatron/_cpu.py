"""Megatron-core on a machine without CUDA: the three shims it needs, in one place.

megatron-core 0.16 is written for CUDA. Its tensor-parallel layers and a local-spec GPTModel train
on CPU over gloo once three CUDA assumptions on the training path are answered:

1. ``torch.cuda.current_device()`` places buffers: RoPE's ``inv_freq`` (``RotaryEmbedding.get_emb``
   moves it there at the first forward), the global memory buffer that ``DotProductAttention``'s
   ``baddbmm`` writes into, the TP all-gather of the logits. Without CUDA that call raises; the shim
   answers the CPU device.
2. The model-parallel RNG tracker forks the CUDA RNG state around dropout in tensor-parallel regions
   (``get_cuda_rng_tracker().fork()``). The shim installs Megatron's own no-op tracker (its
   ``inference_rng_tracker``): exact for Llama, which has no dropout; ``gpt_from_hf`` refuses a
   dropout rate on CPU, where the forked state would be missing.
3. With no mask passed, the unfused softmax builds the causal mask with
   ``get_default_causal_mask``, on ``device="cuda"``. The shim builds the same explicit causal mask
   (True above the diagonal: masked) on the CPU.

:func:`install` applies them only when CUDA is absent, where each original can only raise, so
nothing that worked before changes; it checks that every target still exists and fails with the
megatron-core version otherwise (tests/test_megatron_model.py checks that each shim is still needed
and that a GPTModel trains with them).
"""

from __future__ import annotations

import functools

import torch

SHIMS = ("torch.cuda.current_device", "model-parallel RNG tracker", "causal mask")
_installed: list[str] = []


def needed() -> bool:
    """True on a machine without CUDA (the only place the shims apply)."""
    return not torch.cuda.is_available()


def _cpu_device() -> torch.device:
    return torch.device("cpu")


@functools.lru_cache(maxsize=32)
def cpu_causal_mask(sq: int) -> torch.Tensor:
    """Megatron's default causal mask (True above the diagonal), on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _target(module, name: str):
    if not hasattr(module, name):
        from megatron.core import __version__

        raise RuntimeError(f"ds_accel.megatron: megatron-core {__version__} has no {module.__name__}.{name}; the "
                           "CPU shims in ds_accel/megatron/_cpu.py were written for 0.16.x (pip install -e '.[megatron]')")
    return getattr(module, name)


def install() -> list[str]:
    """Apply the shims once per process on a machine without CUDA; returns the names of those applied."""
    if _installed or not needed():
        return list(_installed)
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random

    _target(torch.cuda, "current_device")
    initialize = _target(mp_random, "initialize_rng_tracker")
    _target(fused_softmax, "get_default_causal_mask")
    torch.cuda.current_device = _cpu_device
    initialize(inference_rng_tracker=True, force_reset=True)
    fused_softmax.get_default_causal_mask = cpu_causal_mask
    _installed.extend(SHIMS)
    return list(_installed)


__all__ = ["SHIMS", "cpu_causal_mask", "install", "needed"]

"""Megatron-core models in ds_accel: Llama as a Megatron GPTModel (fused, GQA-interleaved linear_qkv,
fused linear_fc1, Megatron tensor parallelism) trained inside DeepSpeed, with the V-cycle and SAT.

Needs the ``megatron`` extra (``pip install -e ".[megatron]"``, megatron-core 0.16.x). On a machine
without CUDA the shims of :mod:`ds_accel.megatron._cpu` are applied by :func:`init_parallel`.
"""

import warnings

# megatron-core announces at import that it falls back to torch where Transformer Engine / Apex (CUDA kernels) are
# absent; that is the intended set-up here, not something to act on
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex) (is|are) not installed", category=UserWarning)

from ds_accel.megatron.model import (  # noqa: E402
    MegatronCausalLM,
    gpt_from_hf,
    hf_state_from_gpt,
    load_hf,
    transformer_config,
)
from ds_accel.megatron.params import MegatronParams, unwrap_gpt
from ds_accel.megatron.parallel import init_parallel, mpu

__all__ = [
    "MegatronCausalLM",
    "MegatronParams",
    "gpt_from_hf",
    "hf_state_from_gpt",
    "init_parallel",
    "load_hf",
    "mpu",
    "transformer_config",
    "unwrap_gpt",
]

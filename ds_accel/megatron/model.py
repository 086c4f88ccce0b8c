"""HF Llama <-> Megatron-core GPTModel (local layer spec), and the causal-LM face the trainer calls.

:func:`gpt_from_hf` builds a GPTModel that computes the same function as a ``LlamaForCausalLM``:
RMSNorm (``rms_norm_eps``), SwiGLU MLP, RoPE (``rope_theta``, the non-interleaved "rotate half"
layout both use), GQA, no biases, tied or untied embeddings, sharded over the current TP group
(:func:`ds_accel.megatron.init_parallel`); :func:`hf_state_from_gpt` gathers it back into a HF
state dict. Both go through :class:`ds_accel.megatron.params.MegatronParams`, one HF parameter at a
time. :class:`MegatronCausalLM` wraps the GPTModel with HF's call convention
(``model(input_ids=..., labels=...).loss``, next-token loss with the labels shifted inside), so the
training loop, evaluation and SAT's engine code treat both model families alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from .. import runtime
from . import _cpu
from .layout import check_tp, hf_names, placement
from .params import MegatronParams, unwrap_gpt
from .parallel import tp_group, tp_world


def _rope_theta(config: LlamaConfig) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"gpt_from_hf: RoPE scaling {rope.get('rope_type')!r} is not supported (Llama-2's plain RoPE)")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def transformer_config(config: LlamaConfig, bf16: bool = False) -> TransformerConfig:
    """Megatron's TransformerConfig for a HF Llama config at the current TP size.

    Parameters are fp32 (DeepSpeed casts to bf16 itself, as for HF models); ``bf16`` tells Megatron's
    softmax its input is bf16. No fused kernels (they are CUDA/Apex ones); weights are not initialised
    here (``gpt_from_hf`` writes every one).
    """
    if config.attention_bias or config.mlp_bias:
        raise ValueError("gpt_from_hf: Llama with attention_bias / mlp_bias is not supported (Llama-2 has none)")
    if config.hidden_act != "silu":
        raise ValueError(f"gpt_from_hf: hidden_act {config.hidden_act!r}; Llama's SwiGLU needs silu")
    if config.attention_dropout and _cpu.needed():
        raise ValueError("gpt_from_hf: attention_dropout > 0 needs CUDA (Megatron's model-parallel RNG tracker)")
    check_tp(config, tp_world())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return TransformerConfig(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_key_value_heads,
        kv_channels=head_dim, ffn_hidden_size=config.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=config.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=float(config.attention_dropout),
        init_method_std=config.initializer_range, perform_initialization=False,
        use_cpu_initialization=_cpu.needed(), params_dtype=torch.float32, bf16=bf16,
        tensor_model_parallel_size=tp_world(),
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, cuda_graph_scope=[],
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )


def empty_gpt(config: LlamaConfig, bf16: bool = False) -> nn.Module:
    """A GPTModel of this shape with zero weights (this rank's TP blocks), to be written by name."""
    gpt = GPTModel(transformer_config(config, bf16), get_gpt_layer_local_spec(normalization="RMSNorm"),
                   vocab_size=config.vocab_size, max_sequence_length=config.max_position_embeddings,
                   share_embeddings_and_output_weights=config.tie_word_embeddings,
                   position_embedding_type="rope", rotary_base=_rope_theta(config))
    gpt.to(runtime.device())  # Megatron leaves some modules (its torch norms) on the CPU, as Megatron-LM moves the model
    with torch.no_grad():
        for p in gpt.parameters():
            p.zero_()
    # Megatron marks its split weights while initialising them, which is skipped here; DeepSpeed's gradient
    # norm counts a marked weight on every TP rank and an unmarked one on TP rank 0 only
    split = {where.megatron: where.dim for where in (placement(name, config, tp_world()) for name in hf_names(config))}
    for name, dim in split.items():
        if dim is not None:
            set_tensor_model_parallel_attributes(gpt.get_parameter(name), True, dim, 1)
    return gpt


def load_hf(gpt: nn.Module, config: LlamaConfig, value: Callable[[str, torch.Size], Tensor]) -> None:
    """Write every HF parameter ``value(name, shape)`` (the whole tensor, the same on every rank), one at a time."""
    params = MegatronParams.of(gpt, config)
    for name, shape in params.shapes.items():
        params.write(name, value(name, shape))


def gpt_from_hf(hf_model_or_config: LlamaForCausalLM | LlamaConfig, bf16: bool = False) -> nn.Module:
    """A Megatron GPTModel computing the HF Llama's function, its weights sharded over the TP group.

    Given a config, the weights are zero (fill them with :func:`load_hf`). Collective over the TP group.
    """
    if isinstance(hf_model_or_config, LlamaConfig):
        return empty_gpt(hf_model_or_config, bf16)
    config, state = hf_model_or_config.config, hf_model_or_config.state_dict()
    gpt = empty_gpt(config, bf16)
    load_hf(gpt, config, lambda name, shape: state[name].detach())
    return gpt


@torch.no_grad()
def hf_state_from_gpt(gpt_model: Any, hf_config: LlamaConfig) -> dict[str, Tensor]:
    """The HF Llama state dict (fp32, every key of ``LlamaForCausalLM.state_dict()``, the head of a tied
    model included) of a GPTModel, a :class:`MegatronCausalLM` or a DeepSpeed engine around either.
    Collective over the TP group (and over ZeRO inside an engine)."""
    params = MegatronParams.of(gpt_model, hf_config)
    state = {name: params.read(name) for name in hf_names(hf_config)}
    if hf_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


class MegatronCausalLM(nn.Module):
    """A GPTModel with HF's causal-LM call: ``forward(input_ids, labels=None)`` -> ``.loss`` / ``.logits``.

    The loss is HF's: mean cross entropy of position t's logits against token t+1 (labels -100
    ignored), computed by Megatron's vocab-parallel cross entropy on the TP-sharded logits in fp32.
    Without labels the logits are gathered over the vocabulary blocks ([batch, seq, vocab]).
    ``config``: the HF LlamaConfig the model was built from (export, shapes of the V-cycle levels).
    """

    def __init__(self, gpt: nn.Module, config: LlamaConfig) -> None:
        super().__init__()
        self.gpt, self.config = gpt, config

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, use_cache: bool = False,
                **unused: Any) -> CausalLMOutput:
        logits = self.gpt(input_ids, None, None)  # [batch, seq, vocab / tp]; causal mask: Megatron's default
        if labels is None:
            return CausalLMOutput(logits=tensor_parallel.gather_from_tensor_model_parallel_region(logits, tp_group()))
        target = labels[:, 1:]
        valid = target != -100
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(),
                                                              torch.where(valid, target, 0))
        return CausalLMOutput(loss=(losses * valid).sum() / valid.sum(), logits=None)


__all__ = ["MegatronCausalLM", "empty_gpt", "gpt_from_hf", "hf_state_from_gpt", "load_hf", "transformer_config",
           "unwrap_gpt"]

"""Where each HF Llama parameter lives in a Megatron-core GPTModel, per tensor-parallel rank.

Megatron fuses and interleaves what HF keeps apart (megatron-core 0.16, local layer spec):

* ``self_attention.linear_qkv.weight``: q, k and v of each GQA group together. With g = H / K query
  heads per KV head and d = head_dim, the rows are, group by group,
  ``[q_{jg} .. q_{jg+g-1}, k_j, v_j]`` (each d rows): ``K (g + 2) d`` rows. Column parallel: a rank
  holds K / tp whole groups, i.e. query heads ``[r H/tp, (r+1) H/tp)`` and KV heads ``[r K/tp, ...)``.
* ``mlp.linear_fc1.weight``: ``[gate; up]`` (SwiGLU: ``silu(first half) * second half``), and per
  rank ``[gate_r; up_r]`` of its channels ``[r m/tp, (r+1) m/tp)``: the fused tensor is split per
  half, not as one block.
* ``linear_proj`` / ``linear_fc2`` (row parallel): columns of the rank's heads / channels;
  ``embedding.word_embeddings`` and an untied ``output_layer``: rows of the rank's vocabulary block;
  the RMSNorm weights are replicated. A tied model has no ``output_layer`` weight: the head reads the
  embedding.

A :class:`Placement` says which rows / columns of the local Megatron tensor hold this rank's block of
an HF tensor; the blocks are the tp equal, contiguous slices of the HF tensor along the same
dimension, in rank order, so a TP all-gather + concatenation gives the whole HF tensor. Pure index
arithmetic: no torch.distributed, no DeepSpeed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LlamaConfig

from ..config import ConfigError
from ..structure import UnitShape

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_PARAMS = {  # HF name within a decoder layer -> Megatron name within a TransformerLayer
    "self_attn.q_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.k_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.v_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.gate_proj.weight": "mlp.linear_fc1.weight",
    "mlp.up_proj.weight": "mlp.linear_fc1.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class Placement:
    """One HF parameter on one TP rank: Megatron parameter ``megatron``; ``dim`` None: replicated (the
    whole tensor); else ``local`` indexes, along ``dim`` of the local Megatron tensor, the rank's
    block ``r`` of the HF tensor (its r-th of tp equal slices along ``dim``)."""

    megatron: str
    dim: int | None
    local: Tensor | None = None


def _rows(starts: Tensor, width: int) -> Tensor:
    return (starts[:, None] + torch.arange(width, device=starts.device)).flatten()


def qkv_q_rows(heads: Tensor, shape: UnitShape) -> Tensor:
    """Rows of the local linear_qkv holding the given local query heads (indices within the rank's block)."""
    g, d = shape.groups, shape.head_dim
    return _rows((heads // g) * (g + 2) * d + (heads % g) * d, d)


def qkv_k_rows(kv_heads: Tensor, shape: UnitShape) -> Tensor:
    """Rows of the local linear_qkv holding the keys of the given local KV heads."""
    g, d = shape.groups, shape.head_dim
    return _rows(kv_heads * (g + 2) * d + g * d, d)


def qkv_v_rows(kv_heads: Tensor, shape: UnitShape) -> Tensor:
    """Rows of the local linear_qkv holding the values of the given local KV heads."""
    return qkv_k_rows(kv_heads, shape) + shape.head_dim


def check_tp(config: LlamaConfig, tp: int) -> None:
    """tp must split the KV heads (whole GQA groups per rank), the MLP channels and the vocabulary evenly."""
    for what, n in (("KV heads", config.num_key_value_heads), ("MLP channels", config.intermediate_size),
                    ("vocabulary entries", config.vocab_size)):
        if n % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide the {n} {what} of the model; Megatron's layout "
                             "needs equal blocks (use a tp that divides it)")


def megatron_name(name: str, tied: bool) -> str:
    """The Megatron parameter an HF Llama parameter lives in."""
    if name == "model.embed_tokens.weight" or (name == "lm_head.weight" and tied):
        return "embedding.word_embeddings.weight"
    if name == "lm_head.weight":
        return "output_layer.weight"
    if name == "model.norm.weight":
        return "decoder.final_layernorm.weight"
    m = _LAYER.match(name)
    if m is None or m.group(2) not in _LAYER_PARAMS:
        raise ValueError(f"{name!r} is not a parameter of a HF Llama without biases")
    return f"decoder.layers.{m.group(1)}.{_LAYER_PARAMS[m.group(2)]}"


def placement(name: str, config: LlamaConfig, tp: int) -> Placement:
    """Where the HF parameter ``name`` lives on every TP rank (the local indices are the same on all)."""
    target, key = megatron_name(name, config.tie_word_embeddings), name.rsplit(".", 2)[-2]
    shape = UnitShape.of(config)
    heads, kv, channels = shape.heads // tp, shape.kv_heads // tp, shape.channels // tp
    local = {
        "q_proj": (0, qkv_q_rows(torch.arange(heads), shape)),
        "k_proj": (0, qkv_k_rows(torch.arange(kv), shape)),
        "v_proj": (0, qkv_v_rows(torch.arange(kv), shape)),
        "o_proj": (1, torch.arange(heads * shape.head_dim)),
        "gate_proj": (0, torch.arange(channels)),
        "up_proj": (0, channels + torch.arange(channels)),
        "down_proj": (1, torch.arange(channels)),
        "embed_tokens": (0, torch.arange(config.vocab_size // tp)),
        "lm_head": (0, torch.arange(config.vocab_size // tp)),
    }.get(key)
    return Placement(target, None) if local is None else Placement(target, *local)


def hf_names(config: LlamaConfig) -> list[str]:
    """The HF Llama parameter names of ``config`` in HF order, each once (a tied head is the embedding)."""
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        return [name for name, _ in LlamaForCausalLM(config).named_parameters()]


__all__ = ["Placement", "check_tp", "hf_names", "megatron_name", "placement", "qkv_k_rows", "qkv_q_rows",
           "qkv_v_rows"]

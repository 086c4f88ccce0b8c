"""Llama model presets and construction (HF ``LlamaForCausalLM`` throughout).

The cluster presets carry the published Llama-2 shapes so the planner and a from-scratch run use
the same numbers as a real checkpoint; continual pretraining of a real model uses ``pretrained``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    vocab: int | None = None  # None: the tokenizer's size
    max_positions: int = 4096


PRESETS: dict[str, Preset] = {  # parameter counts: count_params(llama_config(name, vocab))
    # tests: 218K parameters at a 512-token vocab, seconds per run on one CPU core; GQA so every path sees grouped heads
    "tiny": Preset(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=176, tied=True),
    # CPT benchmark's base: 982K parameters at a 2000-token vocab, pretrained on the KJV in under an hour on 2 CPU cores
    "mini": Preset(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344, tied=True),
    # CPU benchmark: 6.3M parameters at a 2000-token vocab
    "small": Preset(hidden=256, layers=8, heads=8, kv_heads=4, intermediate=688, tied=True),
    # a single GPU in minutes: 88M parameters at a 2000-token vocab
    "base": Preset(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, tied=False),
    "llama2-7b": Preset(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, tied=False, vocab=32000),
    "llama2-13b": Preset(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, tied=False, vocab=32000),
    "llama2-70b": Preset(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, tied=False, vocab=32000),
}


def llama_config(preset: str, vocab_size: int, tie: bool | None = None) -> LlamaConfig:
    """A LlamaConfig from a preset name; the vocab follows the tokenizer unless the preset fixes it."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: {preset!r} is not one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=p.vocab or vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
        max_position_embeddings=p.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=p.tied if tie is None else tie, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        attention_bias=False, mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 where DeepSpeed's accelerator runs it natively (CUDA GPUs from Ampere on), else fp32.

    The accelerator is the one DeepSpeed trains on (``DS_ACCELERATOR=cpu`` on a GPU machine means CPU). The
    CPU accelerator reports bf16 support and CPU ranks do train in bf16 (``model.dtype: bf16``,
    tests/test_bf16.py), but auto stays fp32 there: CPU runs are the test suite and the benchmark, whose
    comparisons against single-process and float64 references are argued at fp32 tolerances.
    """
    if name == "auto":
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        native = accelerator.device_name() != "cpu" and accelerator.is_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def model_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    if cfg.pretrained is not None:
        conf = LlamaConfig.from_pretrained(cfg.pretrained)
        if conf.vocab_size < vocab_size:
            raise ConfigError(f"data.tokenizer: the tokenizer has {vocab_size} tokens but {cfg.pretrained} embeds "
                              f"{conf.vocab_size}; use the checkpoint's own tokenizer")
        conf._attn_implementation = "sdpa"
        return conf
    return llama_config(cfg.preset, vocab_size, cfg.tie_word_embeddings)


def build_model(conf: LlamaConfig, pretrained: str | None = None) -> LlamaForCausalLM:
    """A model of shape ``conf`` (weights set later by :func:`initial_value`) or a local checkpoint, in fp32.

    DeepSpeed casts to the training dtype itself; under ZeRO-3 the caller wraps this in
    ``deepspeed.zero.Init`` so each rank materialises only its shard.
    """
    if pretrained is not None:
        return LlamaForCausalLM.from_pretrained(pretrained, config=conf, torch_dtype=torch.float32)
    return LlamaForCausalLM(conf)


def initial_value(name: str, shape: torch.Size, conf: LlamaConfig, seed: int) -> torch.Tensor:
    """Llama's initialisation of the parameter ``name``, drawn from a generator seeded by (seed, name).

    Drawing explicitly (rather than relying on module init) gives the same weights whether the
    model is built whole, partitioned under ``zero.Init``, or split into pipeline stages that each
    initialise only their own layers, on any number of ranks.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * conf.initializer_range


def count_params(conf: LlamaConfig) -> int:
    """Parameters of a Llama config, counted from the shapes (no model needed)."""
    h, m, layers = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers
    hd = getattr(conf, "head_dim", None) or h // conf.num_attention_heads
    attn = h * hd * (2 * conf.num_attention_heads + 2 * conf.num_key_value_heads)
    per_layer = attn + 3 * h * m + 2 * h
    emb = conf.vocab_size * h * (1 if conf.tie_word_embeddings else 2)
    return layers * per_layer + emb + h

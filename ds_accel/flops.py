"""Analytic FLOPs of a Llama training step, counting only what is really computed.

Per token and decoder layer, forward (multiply-adds count 2):
    attention projections  2 h hd (Hq + 2 Hkv) + 2 Hq hd h      (q, k, v, o)
    attention              4 T hd Hq                             (QK^T and AV over the full T x T)
    MLP                    6 h m                                 (gate, up, down)
plus the LM head 2 h V once per token. A training step is 3x the forward (backward = 2x forward).
SAT steps count the kept heads (Hq, Hkv) and channels (m) of each layer; smaller V-cycle levels
count their own shapes. Norms, RoPE, softmax and embeddings lookups are left out (they are O(h)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import LlamaConfig


@dataclass(frozen=True)
class LayerWidth:
    """How many query heads, KV heads and MLP channels one layer computes in a step."""

    q_heads: int
    kv_heads: int
    channels: int


def head_dim(conf: LlamaConfig) -> int:
    return getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads


def dense_widths(conf: LlamaConfig) -> list[LayerWidth]:
    w = LayerWidth(conf.num_attention_heads, conf.num_key_value_heads, conf.intermediate_size)
    return [w] * conf.num_hidden_layers


def layer_forward_flops(conf: LlamaConfig, seq_len: int, w: LayerWidth) -> tuple[float, float, float]:
    """(projections, attention, MLP) forward FLOPs per token of one layer."""
    h, hd = conf.hidden_size, head_dim(conf)
    proj = 2 * h * hd * (w.q_heads + 2 * w.kv_heads) + 2 * w.q_heads * hd * h
    attn = 4 * seq_len * hd * w.q_heads
    mlp = 6 * h * w.channels
    return proj, attn, mlp


def train_flops(conf: LlamaConfig, tokens: int, seq_len: int, widths: Sequence[LayerWidth] | None = None) -> float:
    """FLOPs of forward + backward over ``tokens`` tokens, with per-layer widths (default dense)."""
    widths = dense_widths(conf) if widths is None else widths
    per_token = 2 * conf.hidden_size * conf.vocab_size
    per_token += sum(sum(layer_forward_flops(conf, seq_len, w)) for w in widths)
    return 3.0 * per_token * tokens


def sat_flops_limit_speedup(conf: LlamaConfig, seq_len: int, omission_rate: float) -> float:
    """The spec's limit: total / (total - r * (projections + attention + MLP)), LM head unchanged."""
    total = train_flops(conf, 1, seq_len)
    layers = total - 3.0 * 2 * conf.hidden_size * conf.vocab_size
    return total / (total - omission_rate * layers)

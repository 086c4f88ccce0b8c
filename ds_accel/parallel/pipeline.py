"""Pipeline parallelism for a HF Llama: a DeepSpeed ``PipelineModule`` built from HF's own modules.

The model becomes a flat list of layers, split into contiguous stages::

    index        layer                                   HF names
    0            nn.Embedding (TiedLayerSpec when tied)  model.embed_tokens.*
    1 .. L       LlamaPipeBlock (HF LlamaDecoderLayer)   model.layers.{index-1}.*
    L+1          LlamaRMSNorm                            model.norm.*
    L+2          nn.Linear, or the tied embedding        lm_head.*

Only the hidden state [B, T, H] crosses a stage boundary: every block recomputes RoPE and the
causal mask from the sequence length (two small tensors), so the p2p traffic is one activation
per micro-batch and no stage needs another stage's buffers. The loss is HF's causal-LM loss, so
a pipeline run and a ``LlamaForCausalLM`` run with the same weights and data give the same numbers.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from ..config import ConfigError
from ..data import BlockSampler
from ..ds_private import pipeline_local_specs

TIED_KEY = "embed_tokens"
IGNORE_INDEX = -100  # transformers' label value for "no loss here"


class LlamaPipeBlock(LlamaDecoderLayer):
    """HF's decoder layer with a hidden-state-only interface; its parameter names are HF's.

    The rotary table is built from the config exactly as ``LlamaModel`` builds its own, and the
    mask by HF's ``create_causal_mask`` (None under SDPA, which then runs causal), so the block
    computes what layer ``layer_idx`` of ``LlamaModel`` computes.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.config = config
        self.rotary_emb = LlamaRotaryEmbedding(config=config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=None,
                                  cache=None, position_ids=position_ids)
        return super().forward(hidden_states, attention_mask=mask, position_ids=position_ids,
                               position_embeddings=self.rotary_emb(hidden_states, position_ids))


def tied_head(embedding: nn.Embedding, hidden_states: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied model: logits = h E^T with E the (shared) embedding matrix."""
    return F.linear(hidden_states, embedding.weight)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's ``ForCausalLMLoss``: token t predicts label t+1, mean cross entropy over the B*(T-1) pairs.

    Labels are shifted by padding one IGNORE_INDEX on the right (HF's way rather than slicing the
    logits), so the reduction runs over the same [B*T] rows in the same order and matches to the bit.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, -2), shifted.flatten(), ignore_index=IGNORE_INDEX)


def layer_specs(config: LlamaConfig) -> list[LayerSpec]:
    """Embedding, one block per decoder layer, final norm, head (see the module docstring)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    embedding = (nn.Embedding, vocab, hidden, config.pad_token_id)
    if config.tie_word_embeddings:
        first = TiedLayerSpec(TIED_KEY, *embedding)
        head = TiedLayerSpec(TIED_KEY, *embedding, forward_fn=tied_head)
    else:
        first = LayerSpec(*embedding)
        head = LayerSpec(nn.Linear, hidden, vocab, bias=False)
    blocks = [LayerSpec(LlamaPipeBlock, config, i) for i in range(config.num_hidden_layers)]
    return [first, *blocks, LayerSpec(LlamaRMSNorm, hidden, eps=config.rms_norm_eps), head]


def validate_layout(config: LlamaConfig, pp: int, zero_stage: int, where: str = "the model") -> None:
    """Refuse layouts DeepSpeed would reject late (at ``initialize``) or run with an empty stage.

    ``where``: which model ``config`` is, for the message (a V-cycle level has fewer layers).
    """
    if pp < 1:
        raise ConfigError(f"parallel.pp: the number of pipeline stages must be >= 1, got {pp}")
    if pp > 1 and zero_stage >= 2:
        raise ConfigError("deepspeed.config: ZeRO-2/3 are incompatible with pipeline parallelism; "
                          "use ds_configs/pp2.json (ZeRO-1)")
    if config.num_hidden_layers < pp:
        fix = " (or multilevel.depth_factor=1, or fewer multilevel.levels)" if where != "the model" else ""
        raise ConfigError(f"parallel.pp: {pp} pipeline stages need at least {pp} decoder layers, {where} has "
                          f"{config.num_hidden_layers}; use pp <= {config.num_hidden_layers} or a deeper model{fix}")


def pipeline_llama(config: LlamaConfig, num_stages: int, partition_method: str = "uniform") -> PipelineModule:
    """The Llama of ``config`` as a PipelineModule over ``num_stages`` stages of the current process group.

    ``uniform`` gives every stage the same number of decoder blocks (the embedding goes with the
    first, norm and head with the last). DeepSpeed's own "uniform" counts those three as layers
    too, which for 4 blocks on 2 stages puts 3 blocks on stage 0 and 1 on stage 1; any other
    method ("parameters", "type:regex") is passed to DeepSpeed unchanged. Weights are DeepSpeed's
    default init; set them with :func:`load_hf_state` before ``deepspeed.initialize``.

    Built under ``no_grad``: the constructor broadcasts the tied weight between the first and last
    stage in place, which under autograd leaves a node on the parameter that warns at every
    backward (c10d::broadcast_ has no autograd kernel; torch says this will become an error).
    """
    validate_layout(config, num_stages, zero_stage=0)  # ZeRO is checked where the DeepSpeed config is read
    block = LlamaPipeBlock.__name__
    method = f"type:^{block}$" if partition_method == "uniform" else partition_method
    with torch.no_grad():
        return PipelineModule(layers=layer_specs(config), num_stages=num_stages, loss_fn=causal_lm_loss,
                              partition_method=method, checkpointable_layers=[block])


def _local_layers(pipe: PipelineModule) -> Iterator[tuple[str, nn.Module]]:
    """(HF name prefix, module) for each layer this stage built, from DeepSpeed's own bookkeeping.

    Layers ``pipe._local_start:_local_stop`` of ``pipe._layer_specs`` live here: a LayerSpec as
    the submodule named by its global index, a TiedLayerSpec in ``pipe.tied_modules[key]`` (one
    module even when this stage holds both the embedding and the head).
    """
    specs, local = pipeline_local_specs(pipe)
    last = len(specs) - 1
    names = {0: "model.embed_tokens.", last - 1: "model.norm.", last: "lm_head."}
    for index in local:
        spec = specs[index]
        module = pipe.tied_modules[spec.key] if isinstance(spec, TiedLayerSpec) else pipe.get_submodule(str(index))
        yield names.get(index, f"model.layers.{index - 1}."), module


def local_named_parameters(pipe: PipelineModule) -> Iterator[tuple[str, nn.Parameter]]:
    """This stage's parameters under HF names; a tied head's weight under the embedding's name."""
    aliases = LlamaForCausalLM._tied_weights_keys  # {"lm_head.weight": "model.embed_tokens.weight"}
    for prefix, module in _local_layers(pipe):
        tied = module in pipe.tied_modules.values()
        for name, p in module.named_parameters():
            key = prefix + name
            yield (aliases.get(key, key) if tied else key), p


def local_decoder_layers(pipe: PipelineModule) -> dict[int, LlamaPipeBlock]:
    """{HF layer index: block} of this stage (what SAT scores and slices per stage)."""
    return {int(prefix.split(".")[2]): module for prefix, module in _local_layers(pipe)
            if isinstance(module, LlamaPipeBlock)}


def load_hf_state(pipe: PipelineModule, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a ``LlamaForCausalLM`` state dict into this stage's layers (every stage passes the whole dict).

    A tied head reads ``lm_head.weight`` when present, else the embedding it is tied to
    (``save_pretrained`` stores a tied weight once, under the embedding's name). Copies are in
    place, before ``deepspeed.initialize`` builds its optimizer copies of the weights.
    """
    aliases = LlamaForCausalLM._tied_weights_keys  # {"lm_head.weight": "model.embed_tokens.weight"}
    for prefix, module in _local_layers(pipe):
        tied = module in pipe.tied_modules.values()
        own = {}
        for name in module.state_dict():
            key = prefix + name
            own[name] = hf_state[aliases[key] if tied and key not in hf_state else key]
        module.load_state_dict(own)


def hf_state_dict(pipe: PipelineModule) -> dict[str, torch.Tensor]:
    """This stage's weights under HF names (copies); the union over stages is a full HF state dict.

    A tied weight appears under ``model.embed_tokens.weight`` on the first stage and under
    ``lm_head.weight`` on the last, as in ``LlamaForCausalLM.state_dict()``.
    """
    return {prefix + name: value.detach().clone()
            for prefix, module in _local_layers(pipe) for name, value in module.state_dict().items()}


def pipeline_batches(train: torch.Tensor, sampler: BlockSampler, step: int,
                     dp_rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) for the ``sampler.accum`` micro-batches of global ``step``, for ``train_batch``.

    The blocks are ``sampler.indices(step, micro_step, dp_rank)``, the ones the non-pipeline
    trainer uses, with the sampler's world being the data-parallel size (world / stages). Labels
    are the inputs: the loss shifts them. DeepSpeed reads inputs on the first stage and labels on
    the last, and moves them to the device itself.
    """
    for micro_step in range(sampler.accum):
        blocks = train[sampler.indices(step, micro_step, dp_rank)]
        yield blocks, blocks

"""``model.backend: megatron`` in the trainer: the checks, models, level views and export of that backend.

The training loop stays the HF one; what differs lives here: the model is a :class:`MegatronCausalLM`
(a Megatron-core GPTModel built from the level's LlamaConfig, weights drawn by
``models.initial_value`` per HF parameter, so a seed gives the same model as the HF backend), the
engine gets Megatron's parallel state as DeepSpeed's ``mpu`` (``engine.build.make_engine``),
transitions read and write through :class:`MegatronParams`, and the export gathers back into a HF
directory. Tensor parallelism is Megatron's, ``parallel.tp`` ranks per group (consecutive ranks,
as AutoTP's, so the data sampler's ``rank // tp`` holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from transformers import LlamaConfig

from ..config import ConfigError, TrainConfig
from ..engine.export import write_hf
from ..engine.sat import DecoderFamily
from ..models import build_model, initial_value, resolve_dtype
from ..parallel.tensor import TensorParallel
from . import sat as msat
from .model import MegatronCausalLM, empty_gpt, hf_state_from_gpt, load_hf
from .params import MegatronParams
from .parallel import init_parallel


def check_config(cfg: TrainConfig, ds: dict) -> None:
    """Refuse what the Megatron backend cannot run, before any work (the shapes are checked with the
    HF backend's TP checks: heads, KV heads and channels of every level divisible by ``parallel.tp``)."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage > 1:
        raise ConfigError(f"deepspeed.config: ZeRO stage {stage} with model.backend megatron, which runs under ZeRO 0-1 "
                          "(ZeRO-3 would partition Megatron's layers at construction; ZeRO-2 is untested): use "
                          "ds_configs/zero1.json")
    if int(ds.get("tensor_parallel", {}).get("autotp_size", 1) or 1) > 1:
        raise ConfigError("deepspeed.config: tensor_parallel.autotp_size with model.backend megatron; the Megatron "
                          "backend's tensor parallelism is parallel.tp: remove tensor_parallel from the DeepSpeed config")
    tp = cfg.parallel.tp
    if cfg.model.pretrained is None and cfg.data.tokenizer is None and cfg.data.vocab_size % tp:
        raise ConfigError(f"data.vocab_size: {cfg.data.vocab_size} is not divisible by parallel.tp={tp} (Megatron "
                          "splits the vocabulary evenly over the TP ranks); use a multiple of it")


def new_model(conf: LlamaConfig, cfg: TrainConfig, seed: int | None, pretrained: str | None = None) -> MegatronCausalLM:
    """This rank's TP block of a model of shape ``conf``: a local checkpoint (read whole on every rank),
    the HF backend's seeded initialisation (``initial_value`` per HF parameter), or zeros (``seed``
    None: a transition fills it)."""
    init_parallel(cfg.parallel.tp, cfg.run.seed)
    gpt = empty_gpt(conf, bf16=resolve_dtype(cfg.model.dtype) == torch.bfloat16)
    if pretrained is not None:
        state = build_model(conf, pretrained).state_dict()
        load_hf(gpt, conf, lambda name, shape: state[name])
    elif seed is not None:
        load_hf(gpt, conf, lambda name, shape: initial_value(name, shape, conf, seed))
    return MegatronCausalLM(gpt, conf)


def level_params(model: Any, conf: LlamaConfig, optimizer: Any = None) -> MegatronParams:
    """The level's parameters by HF name for ``engine.transitions`` (Adam moments are not mapped)."""
    return MegatronParams.of(model, conf)


def export_hf(engine: Any, conf: LlamaConfig, out_dir: Path, tokenizer: Any = None) -> Path:
    """A HF Llama directory of the engine's model (fp32 masters gathered over ZeRO and TP); collective,
    rank 0 writes ``save_pretrained`` output that ``LlamaForCausalLM.from_pretrained`` loads."""
    return write_hf(hf_state_from_gpt(engine, conf), conf, out_dir, tokenizer)


def _tensor_parallel(model: Any) -> TensorParallel | None:
    """Megatron's TP layout of a model, for SAT: this rank's block and Megatron's TP / DP groups."""
    shard = msat.tensor_shard(next(iter(msat.decoder_layers(model).values())))
    if shard is None:
        return None
    return TensorParallel(shard, parallel_state.get_tensor_model_parallel_group(),
                          parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_group())


def _omit(layers, keep_heads, keep_channels, tracker, shard, micro_batches, keep_slices, resolved, forwards):
    # ``forwards`` is not needed: Megatron's slices are always the gather-once kind
    return msat.omit(layers, keep_heads, keep_channels, tracker, shard, micro_batches=micro_batches,
                     keep_slices=keep_slices, selection=resolved)


# SAT on Megatron layers (ds_accel.engine.sat.SATController(family=MEGATRON))
MEGATRON = DecoderFamily(
    decoder_layers=msat.decoder_layers, unit_shape=msat.unit_shape, tensor_parallel=_tensor_parallel,
    resolve=msat.resolve, omit=_omit,
    omitted_slices=lambda layers, keep_heads, keep_channels, shard, resolved:
        msat.omitted_slices(layers, keep_heads, keep_channels, shard),
    device=lambda layer: layer.mlp.linear_fc2.weight.device)


__all__ = ["MEGATRON", "check_config", "export_hf", "level_params", "new_model"]

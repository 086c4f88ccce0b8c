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

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import LlamaConfig, LlamaForCausalLM

from .. import runtime
from ..config import ConfigError, TrainConfig
from ..engine.sat import SATController, _on_host, frozen_fragments, gather_tp_scores
from ..flops import LayerWidth
from ..models import build_model, initial_value, resolve_dtype
from ..parallel.tensor import TensorParallel
from ..sat import ImportanceTracker, select
from ..sat.optim_guard import OmittedSlice
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
    state = hf_state_from_gpt(engine, conf)
    if runtime.rank() == 0:
        model = LlamaForCausalLM(conf)
        model.load_state_dict({name: value.cpu() for name, value in state.items()}, strict=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()
    return out_dir


class MegatronSATController(SATController):
    """:class:`ds_accel.engine.sat.SATController` on a Megatron model: the same LORS rate, importance,
    DP-averaged (and TP-gathered) selection and optimizer policy, with the layer structure of
    :mod:`ds_accel.megatron.sat` (unit shape, Megatron's TP shard, sliced forward, omitted slices).

    It overrides what reads HF's layer structure in the parent (sizing the tracker, resolving a
    selection into HF rows, the FLOPs widths); the per-step flow is the parent's. Until
    ``SATController`` takes a model family's description from ``ds_accel.structure``, ``begin_step``
    repeats the parent's without its HF ``resolve`` (the sliced forward resolves its own indices).
    """

    def rebind(self, model: Any) -> None:
        self.model = model
        self.layers = msat.decoder_layers(model)
        first = next(iter(self.layers.values()))
        shape, shard = msat.unit_shape(first), msat.tensor_shard(first)
        self.tp = None if shard is None else TensorParallel(
            shard, parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_group())
        self.tracker = ImportanceTracker(self.layers, shape.heads, shape.kv_heads, shape.channels, shape.head_dim,
                                         decay=self.cfg.ema_decay, metric=self.cfg.metric, seed=self.seed,
                                         device=first.mlp.linear_fc2.weight.device)
        self.keep_heads, self.keep_channels = {}, {}
        self.zero3 = False  # refused by check_config

    def begin_step(self, step: int) -> float:
        start = time.perf_counter()
        rate = self.lors.rate(step)
        if step % self.cfg.reselect_every == 0 or rate != self.rate:
            if self.tp is not None:
                gather_tp_scores(self.tracker, self.tp)
            self._average_scores()
            shards = self.tp.size if self.tp is not None and self.cfg.tp_selection == "balanced" else 1
            heads, channels = select(_on_host(self.tracker), rate, self.cfg.granularity, num_shards=shards,
                                     head_omission_rate=rate if self.cfg.heads else 0.0)
            self.keep_heads, self.keep_channels = heads, channels if self.cfg.channels else {}
        self.rate = rate
        if self.guard is not None and (self.keep_heads or self.keep_channels):
            slices = self.omitted()
            self.guard.arm(lambda: frozen_fragments(self.guard.optimizer, slices))
        self.bookkeeping_s += time.perf_counter() - start
        return rate

    def omitting(self):
        """The step's sliced forward and backward; weight slices taken once per optimizer step."""
        return msat.omit(self.layers, self.keep_heads, self.keep_channels, self.tracker, self._shard,
                         micro_batches=self.micro_batches)

    def omitted(self) -> list[OmittedSlice]:
        return msat.omitted_slices(self.layers, self.keep_heads, self.keep_channels, self._shard)

    def _local_widths(self) -> dict[int, LayerWidth]:
        widths = {}
        for index, layer in self.layers.items():
            shape = msat.unit_shape(layer)
            q, kv, m = shape.heads, shape.kv_heads, shape.channels
            if index in self.keep_heads:
                q, kv = len(self.keep_heads[index]), len(torch.unique(self.keep_heads[index] // shape.groups))
            if index in self.keep_channels:
                m = len(self.keep_channels[index])
            widths[index] = LayerWidth(q, kv, m)
        return widths

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.rate, self.keep_heads, self.keep_channels = state["rate"], state["keep_heads"], state["keep_channels"]


__all__ = ["MegatronSATController", "check_config", "export_hf", "level_params", "new_model"]

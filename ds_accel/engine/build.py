"""DeepSpeed config resolution and engine construction for one model level.

The JSONs in ds_configs/ hold what is DeepSpeed's business (ZeRO stage, bucket sizes, monitor);
values written "auto" there are filled from the run config, so batch size, clipping and dtype
are set in one place. A concrete value that disagrees with the run config is an error rather than
a silent winner. The optimizer is torch's fused AdamW passed to ``deepspeed.initialize``: one ATen
kernel on CPU and CUDA alike (no JIT-built DeepSpeed op), about nine times faster on a 2-core CPU than
torch's per-tensor loop there (docs/benchmark/step/adamw_probe/). Under ZeRO-Offload
(``zero_optimization.offload_optimizer``) the same fused AdamW steps the master weights and moments in
host memory (``zero_force_ds_cpu_optimizer`` off: DeepSpeed otherwise insists on its ``DeepSpeedCPUAdam``,
a C++ op JIT-built at the first use, 80 s on 2 cores and a compiler on every node; torch's kernel was
as fast on this CPU, docs/benchmark/step/adamw_probe/offload_probe.txt).
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import torch

from ..config import ConfigError, OptimConfig, TrainConfig, offloads_optimizer, zero_stage
from ..models import build_model, initial_value, resolve_dtype
from .params import write_param


def _fill(ds: dict, key: str, value: Any, field: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"{field}: {value!r} disagrees with {key}={current!r} in the DeepSpeed config; "
                          f"set {key} to \"auto\" there or make them equal")


def resolve_ds_config(cfg: TrainConfig, dp_world: int) -> dict:
    """The DeepSpeed config dict for this run, with every "auto" filled."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text())
    o = cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", o.micro_batch_size, "optim.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", o.grad_accum, "optim.grad_accum")
    _fill(ds, "train_batch_size", o.micro_batch_size * o.grad_accum * dp_world, "optim.micro_batch_size")
    _fill(ds, "gradient_clipping", o.grad_clip, "optim.grad_clip")
    bf16 = resolve_dtype(cfg.model.dtype) == torch.bfloat16
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", bf16, "model.dtype")
    if "optimizer" in ds:
        raise ConfigError(f"deepspeed.config: {cfg.deepspeed.config} has an \"optimizer\" section; remove it, "
                          "ds_accel builds AdamW from the optim section (it is rebuilt at every level)")
    ds["zero_allow_untested_optimizer"] = True
    if offloads_optimizer(ds):  # torch's fused AdamW on the host partitions (module docstring)
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(f"deepspeed.config: zero_force_ds_cpu_optimizer is true in {cfg.deepspeed.config}, "
                              "which asks for DeepSpeedCPUAdam; ds_accel steps torch's fused AdamW on the offloaded "
                              "state, so remove zero_force_ds_cpu_optimizer")
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)
    out = Path(cfg.run.output_dir)
    for monitor in ("tensorboard", "csv_monitor"):
        if ds.get(monitor, {}).get("output_path") == "auto":
            ds[monitor]["output_path"] = str(out / "monitor")
            ds[monitor].setdefault("job_name", monitor)
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config: zero_optimization.stage must be 0-3, got {stage}")
    if offloads_optimizer(ds) and stage == 0:
        raise ConfigError("deepspeed.config: zero_optimization.offload_optimizer needs ZeRO stage 1-3 (DeepSpeed "
                          "offloads the partitioned optimizer state); set zero_optimization.stage, or use "
                          "ds_configs/zero2_offload.json or zero3_offload.json")
    return ds


def new_model(conf, ds: dict, seed: int | None, pretrained: str | None = None) -> torch.nn.Module:
    """A model of this shape, partitioned at construction under ZeRO-3 (each rank builds its shard).

    With ``seed`` the weights are drawn by ``initial_value`` one parameter at a time (identical
    under every ZeRO stage and rank count); ``None`` leaves them to be filled by a transition.
    """
    if pretrained is not None and zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)  # makes from_pretrained load straight into zero.Init shards
        model = build_model(conf, pretrained)
        del keep_alive
        return model
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3):
        model = build_model(conf, pretrained)
    if pretrained is None and seed is not None:
        for name, p in model.named_parameters():
            write_param(p, initial_value(name, getattr(p, "ds_shape", p.shape), conf, seed))
    return model


def new_pipeline_model(conf, pp: int, seed: int | None, pretrained: str | None = None) -> torch.nn.Module:
    """This rank's pipeline stage of the model, with the same weights ``new_model`` would give
    (``seed`` None: DeepSpeed's default init, to be overwritten by a level transition)."""
    from ..parallel.pipeline import load_hf_state, local_named_parameters, pipeline_llama

    pipe = pipeline_llama(conf, pp)
    if pretrained is not None:
        load_hf_state(pipe, build_model(conf, pretrained).state_dict())
    elif seed is not None:
        with torch.no_grad():
            for name, p in local_named_parameters(pipe):
                p.copy_(initial_value(name, p.shape, conf, seed))
    return pipe


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """The run's optimizer (see the module docstring); the step benchmark times the same one."""
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=True)


@contextmanager
def _inert_construction_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Make a zero-gradient step that a wrapper takes while it is built leave no trace.

    DeepSpeed's low-precision wrapper without ZeRO (``FP16_UnfusedOptimizer``: bf16 or fp16 at ZeRO-0
    with a torch optimizer) steps the optimizer once with zero gradients inside ``deepspeed.initialize``
    to create its state. At the run's LR that step applies AdamW's weight decay once and counts as
    Adam's step 1, so the first real step used step 2's bias correction: about 0.74 of Adam's first
    update. Here LR and weight decay are 0 while the engine is built, and a state created then is
    reset to step 0 with zero moments: the first real step is AdamW's first (tests/test_bf16.py).
    """
    saved = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
    try:
        yield
    finally:
        if len(optimizer.param_groups) != len(saved):
            raise RuntimeError("deepspeed.initialize changed the optimizer's parameter groups; "
                               "cannot restore their LR and weight decay")
        for group, (lr, weight_decay) in zip(optimizer.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, weight_decay
    for state in optimizer.state.values():
        for key, value in state.items():
            if key in ("step", "exp_avg", "exp_avg_sq") and torch.is_tensor(value):
                value.zero_()


def make_engine(model: torch.nn.Module, cfg: TrainConfig, ds: dict):
    """``deepspeed.initialize`` with a fresh AdamW (the V-cycle's optimizer policy is `fresh`)."""
    optimizer = adamw(model, cfg.optim)
    mpu = None
    if cfg.model.backend == "megatron":  # Megatron's parallel state: DeepSpeed's data-parallel and TP groups
        from ..megatron import mpu
    with _inert_construction_step(optimizer):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(ds), mpu=mpu)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def free_engine(engine) -> None:
    """Release an engine's hooks, partitions and buffers before the next level's engine grows."""
    engine.destroy()
    gc.collect()

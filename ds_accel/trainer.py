"""The training loop: dense, V-cycle (multi-level) and SAT continual pretraining on DeepSpeed.

One function, :func:`train`, reads top to bottom: build the level's engine, run its steps (each
step: SAT selection, micro-batches, optimizer step, metrics, validation, checkpoint), then move to
the next V-cycle stage, and at the end export a HF directory and plot the losses. The same code
runs as one process and under the ``deepspeed`` launcher; all ZeRO/engine knowledge lives in
``ds_accel.engine``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint, runtime
from .config import ConfigError, TrainConfig, zero_stage
from .data import BlockSampler, Corpus, load_tokenizer, prepare
from .engine import elastic
from .engine.build import free_engine, make_engine, new_model, new_pipeline_model, resolve_ds_config, set_lr
from .engine.export import export_hf
from .engine.sat import HF_LLAMA, NoSAT, SATController
from .engine.transitions import LevelParams, coalesce_into, decoalesce_into, keep_shards
from .flops import train_flops
from .metrics import MetricsLog, plot_losses
from .models import count_params, model_config
from .multilevel.operators import level_map
from .multilevel import schedule
from .multilevel.vcycle import Stage, level_configs, plan
from .parallel.pipeline import pipeline_batches, validate_layout
from .parallel.tensor import tp_size, validate_tp


@dataclass
class RunState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int = 0  # global optimizer steps done; also the data position (the sampler is deterministic)
    stage: int = 0  # V-cycle stage index
    tokens: int = 0
    flops: float = 0.0
    wall_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(cfg: TrainConfig, step: int, stage: Stage) -> float:
    """The LR of global step ``step`` in ``stage``: ``multilevel.lr_schedule`` (authors, stage, run), see
    ``ds_accel.multilevel.schedule``."""
    return schedule.lr_at(cfg.optim, cfg.multilevel, cfg.run.total_steps, stage, step)


def _mean_over_ranks(value: torch.Tensor | float) -> float:
    """The mean over all ranks, read on the host (one synchronisation): the tensor handed to the
    all-reduce lives on the accelerator (NCCL has no host tensors)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=runtime.device()).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


@torch.no_grad()
def evaluate(engine, val: torch.Tensor, cfg: TrainConfig, dp_rank: int, dp_world: int) -> float:
    """Mean validation loss over a fixed set of blocks, split evenly over data-parallel ranks (every
    rank runs the same number of forwards, which ZeRO-3's collective gathers need)."""
    micro = cfg.optim.micro_batch_size
    n_batches = max(1, min(cfg.run.eval_batches, len(val) // (micro * dp_world)))
    blocks = [val[(b * dp_world + dp_rank) * micro:][:micro] for b in range(n_batches)]
    engine.eval()
    if _is_pipeline(engine):  # the pipeline schedule averages the micro-batches and broadcasts the loss
        loss = engine.eval_batch(iter([(x, x) for x in blocks]), num_micro_batches=n_batches)
    else:
        loss = sum(engine(input_ids=x.to(runtime.device()), labels=x.to(runtime.device()),
                          use_cache=False).loss.float() for x in blocks) / n_batches
    engine.train()
    return _mean_over_ranks(loss)


def _is_pipeline(engine) -> bool:
    return hasattr(engine, "train_batch") and hasattr(engine, "grid")


def _prepare_data(cfg: TrainConfig) -> Corpus:
    """Rank 0 trains the tokenizer and packs the corpus into the cache; the others then read it."""
    if runtime.rank() == 0:
        corpus = prepare(cfg.data)
    if dist.is_initialized():
        dist.barrier()
    return corpus if runtime.rank() == 0 else prepare(cfg.data)


def _sat_layers(engine):
    """What SAT scores and slices on this rank: the whole model, or its pipeline stage's blocks."""
    if _is_pipeline(engine):
        from .parallel.pipeline import local_decoder_layers

        return local_decoder_layers(engine.module)
    return engine.module


def _sat_controller(cfg: TrainConfig, engine) -> SATController | NoSAT:
    if not cfg.sat.enabled:
        return NoSAT()
    groups = (engine.grid.get_data_parallel_group(), engine.grid.get_pipe_parallel_group()) \
        if _is_pipeline(engine) else (None, None)
    family = _megatron().MEGATRON if cfg.model.backend == "megatron" else HF_LLAMA
    sat = SATController(cfg.sat, _sat_layers(engine), cfg.run.total_steps, cfg.run.seed, *groups,
                        micro_batches=cfg.optim.grad_accum, family=family)
    sat.attach(engine.optimizer)
    return sat


def train_step(engine, sat: SATController | NoSAT, step: int, corpus: Corpus, sampler: BlockSampler,
               dp_rank: int) -> torch.Tensor:
    """One optimizer step over ``sampler.accum`` micro-batches; returns this rank's mean loss (on the device).

    SAT chooses the units once, every micro-batch computes the same sliced network (the weight slices
    are taken once), and the optimizer step applies SAT's optimizer policy; dense runs go through the
    same lines with :class:`NoSAT`.
    """
    sat.begin_step(step)
    with sat.omitting():
        if _is_pipeline(engine):  # the schedule runs all micro-batches and the optimizer step
            loss = engine.train_batch(pipeline_batches(corpus.train, sampler, step, dp_rank))
        else:
            loss = torch.zeros((), device=runtime.device())
            for micro_step in range(sampler.accum):
                x = corpus.train[sampler.indices(step, micro_step, dp_rank)].to(runtime.device())
                micro_loss = engine(input_ids=x, labels=x, use_cache=False).loss
                engine.backward(micro_loss)
                engine.step()
                loss += micro_loss.detach().float() / sampler.accum
    sat.end_step()
    return loss


def _check_layout(cfg: TrainConfig, ds: dict, world: int, tp: int) -> None:
    """Refuse a parallel layout that can't run, before the data or any engine is built (the shapes of
    every V-cycle level follow from the config)."""
    if cfg.model.backend == "megatron":
        _megatron().check_config(cfg, ds)
    pp = cfg.parallel.pp
    if pp > 1 and tp > 1:
        raise ConfigError("parallel.pp: pipeline and tensor parallelism together are not supported yet; use "
                          "parallel.pp=1 with a TP config (ds_configs/tp2.json) or pp>1 with ds_configs/pp2.json")
    # heads, channels and layers only: the vocabulary is the tokenizer's, known after data preparation
    shape = model_config(cfg.model, 1 if cfg.model.pretrained else cfg.data.vocab_size)
    levels = level_configs(shape, cfg.multilevel)[1:] if cfg.multilevel.enabled else []
    if pp > 1:
        for where, conf in [("the model", shape)] + [(f"V-cycle level {i}", c) for i, c in enumerate(levels, 2)]:
            validate_layout(conf, pp, zero_stage(ds), where)
    if tp > 1:
        validate_tp(shape, tp, levels)
        if zero_stage(ds) == 3:
            raise ConfigError(f"deepspeed.config: ZeRO-3 together with tensor parallelism (autotp_size {tp}) is not "
                              "supported: a ZeRO-3 partition of an AutoTP block has no full-parameter view for level "
                              "transitions, export and SAT's frozen rows; use ZeRO stage 1 (ds_configs/tp2.json) "
                              "with tensor parallelism, or ZeRO-3 without it")
    if (cfg.multilevel.enabled and cfg.multilevel.optimizer_policy == "transfer" and zero_stage(ds) == 0
            and ds.get("bf16", {}).get("enabled") is True):
        raise ConfigError("multilevel.optimizer_policy: transfer can't reach Adam's moments under ZeRO-0 with bf16 "
                          "(DeepSpeed wraps AdamW in FP16_UnfusedOptimizer, whose fp32 state neither torch nor "
                          "safe_get_full_optimizer_state reaches); use ZeRO stage 1-3 (ds_configs/zero1.json) or "
                          "optimizer_policy fresh")
    if world % (pp * tp):
        raise ConfigError(f"parallel.pp: {world} ranks can't be split into {pp} pipeline stages x {tp} tensor-"
                          f"parallel ranks (tensor_parallel.autotp_size in {cfg.deepspeed.config}); use sizes "
                          "whose product divides the number of ranks")


def _megatron():
    """model.backend megatron's models, checks, level views and export (imports megatron-core only when used)."""
    from .megatron import engine

    return engine


def _new_level_model(cfg: TrainConfig, ds: dict, conf, seed: int | None, pretrained: str | None = None):
    if cfg.model.backend == "megatron":
        return _megatron().new_model(conf, cfg, seed, pretrained)
    if cfg.parallel.pp > 1:
        return new_pipeline_model(conf, cfg.parallel.pp, seed, pretrained)
    return new_model(conf, ds, seed, pretrained)


def _level_maps(cfg: TrainConfig, stages: list[Stage]):
    """The operator map between level k and k+1, keyed by the deeper level."""
    ml = cfg.multilevel
    configs = {s.level: s.config for s in stages}
    return {lv: level_map(configs[lv - 1], ml.width_factor, ml.depth_factor, ml.pairing)
            for lv in configs if lv > 1}


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the configured training; returns the final metrics. Collective: call on every rank."""
    runtime.init_distributed()
    rank, world = runtime.rank(), runtime.world_size()
    out = Path(cfg.run.output_dir)
    ckpt_root = out / "checkpoints"
    pp = cfg.parallel.pp
    # DeepSpeed counts AutoTP ranks in train_batch_size; Megatron's (parallel.tp) it learns from the mpu
    ds = resolve_ds_config(cfg, world // (pp * cfg.parallel.tp))
    tp = cfg.parallel.tp if cfg.model.backend == "megatron" else tp_size(ds)
    layout = elastic.Layout.of(cfg, ds, world, tp)
    resumed = elastic.check_resume(ckpt_root, layout) if resume else None  # refuses what can't convert, before work
    _check_layout(cfg, ds, world, tp)
    corpus = _prepare_data(cfg)
    stages = plan(model_config(cfg.model, corpus.vocab_size), cfg.multilevel, cfg.run.total_steps)
    dp_world, data_rank = world // (pp * tp), rank // tp  # AutoTP groups are consecutive ranks
    maps = _level_maps(cfg, stages) if cfg.multilevel.enabled else {}
    o = cfg.optim
    sampler = BlockSampler(len(corpus.train), o.micro_batch_size, o.grad_accum, dp_world, cfg.run.seed)
    tokens_per_step = sampler.global_batch * cfg.data.seq_len

    state, kept = RunState(), {}
    tag = resumed.tag if resumed is not None else None
    if tag is not None:
        state = RunState(**checkpoint.read_run_state(ckpt_root, tag))
    stage = stages[state.stage]
    pretrained = cfg.model.pretrained if stage.level == 1 and tag is None else None
    engine = make_engine(_new_level_model(cfg, ds, stage.config, cfg.run.seed, pretrained), cfg, ds)
    dp_rank = engine.grid.get_data_parallel_rank() if _is_pipeline(engine) else data_rank
    sat = _sat_controller(cfg, engine)
    if tag is not None:
        kept = resumed.load(engine, sat, stage)  # converts a checkpoint of another layout first
        sat.attach(engine.optimizer)  # the load replaced the optimizer state that SAT's policy hooks read
    log = MetricsLog(out, state.history, enabled=rank == 0)
    bar = _progress(cfg, state.step) if rank == 0 else None

    def save() -> None:
        state.history = log.rows
        extra = {"kept": kept, "sat": sat.state_dict()}
        checkpoint.save(engine, ckpt_root, state.step, vars(state), extra, cfg.run.keep_checkpoints,
                        elastic.record(engine, layout))

    while True:
        while state.step < stage.end:
            if stop_after is not None and state.step >= stop_after:
                save()
                return {"stopped_at": state.step}
            t0 = time.perf_counter()
            lr = lr_at(cfg, state.step, stage)
            set_lr(engine, lr)
            loss = _mean_over_ranks(train_step(engine, sat, state.step, corpus, sampler, dp_rank))
            rate = sat.rate
            step_flops = train_flops(stage.config, tokens_per_step, cfg.data.seq_len, sat.widths())
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += tokens_per_step
            state.flops += step_flops
            state.wall_s += dt
            row: dict[str, Any] = {}
            if state.step % cfg.run.log_every == 0 or state.step == cfg.run.total_steps:
                row = {"loss": loss, "lr": lr, "level": stage.level, "omission_rate": rate,
                       "tokens_per_s": tokens_per_step / dt, "step_flops": step_flops}
            if state.step % cfg.run.eval_every == 0 or state.step == cfg.run.total_steps:
                row["val_loss"] = evaluate(engine, corpus.val, cfg, dp_rank, dp_world)
            if row:
                log.log({"step": state.step, "tokens": state.tokens, "flops": state.flops,
                         "wall_s": state.wall_s, **row}, engine.monitor)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", level=stage.level, rate=f"{rate:.2f}",
                                tok_s=f"{tokens_per_step / dt:,.0f}")
                bar.update(1)
            if cfg.run.save_every and state.step % cfg.run.save_every == 0 and state.step < cfg.run.total_steps:
                save()
        if state.stage == len(stages) - 1:
            break
        engine, stage = _transition(cfg, ds, engine, stage, stages[state.stage + 1], maps, kept, log, state)
        state.stage = stage.index
        sat.rebind(_sat_layers(engine))
        sat.attach(engine.optimizer)

    if bar is not None:
        bar.close()
    save()
    final_val = next((r["val_loss"] for r in reversed(log.rows) if "val_loss" in r), None)
    result = {"step": state.step, "val_loss": final_val, "tokens": state.tokens, "flops": state.flops,
              "wall_s": state.wall_s, "sat_bookkeeping_s": sat.bookkeeping_s, "sat_selections": sat.selections,
              "sat_selection_changes": sat.selection_changes, "output_dir": str(out),
              "layout": {"data_parallel": dp_world, "tensor_parallel": tp, "pipeline_parallel": pp}}
    if cfg.run.export:
        export = _megatron().export_hf if cfg.model.backend == "megatron" else export_hf
        result["export_dir"] = str(export(engine, stage.config, out / "export", load_tokenizer(corpus.tokenizer_dir)))
    result["peak_mem_mb"] = runtime.peak_memory_mb()
    if rank == 0:
        result["plot"] = str(plot_losses(log.rows, out / "loss.png", _title(cfg)))
        (out / "result.json").write_text(json.dumps(result, indent=1))
    free_engine(engine)
    return result


def _transition(cfg, ds, engine, stage: Stage, nxt: Stage, maps, kept, log: MetricsLog, state: RunState):
    """Build the next stage's engine and fill it from the current one with the pure operators (and, with
    ``optimizer_policy: transfer``, its Adam moments; ``fresh`` leaves the new AdamW without state)."""
    model = _new_level_model(cfg, ds, nxt.config, seed=None)
    new_engine = make_engine(model, cfg, ds)
    level = _megatron().level_params if cfg.model.backend == "megatron" else LevelParams.of
    old = level(engine.module, stage.config, engine.optimizer)
    new = level(new_engine.module, nxt.config, new_engine.optimizer)
    moments = cfg.multilevel.optimizer_policy == "transfer"
    if nxt.level > stage.level:
        kept[stage.level] = keep_shards(old)
        coalesce_into(old, new, maps[nxt.level], moments)
        kind = "coalesce"
    else:
        decoalesce_into(old, new, maps[stage.level], kept.pop(nxt.level), cfg.multilevel.alpha, moments)
        kind = "decoalesce+interpolate"
    free_engine(engine)
    c = nxt.config
    log.log({"step": state.step, "transition": kind, "level": nxt.level, "params": count_params(c),
             "shape": f"h{c.hidden_size} L{c.num_hidden_layers} H{c.num_attention_heads} "
                      f"K{c.num_key_value_heads} m{c.intermediate_size}"})
    return new_engine, nxt


def _progress(cfg: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.run.total_steps, initial=initial, desc="train", disable=not cfg.run.progress,
                dynamic_ncols=True)


def _title(cfg: TrainConfig) -> str:
    parts = [cfg.model.preset if cfg.model.pretrained is None else Path(cfg.model.pretrained).name]
    if cfg.multilevel.enabled:
        parts.append(f"V-cycle x{cfg.multilevel.levels}")
    if cfg.sat.enabled:
        parts.append(f"SAT r={cfg.sat.omission_rate}")
    return " | ".join(parts)

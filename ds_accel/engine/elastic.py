"""Elastic resume: continue a run from a checkpoint written on another number of ranks or another
parallel layout (data-parallel size, ZeRO stage, AutoTP degree, pipeline stages, dtype).

Every checkpoint records its :class:`Layout` (``layout.json``). A resume on another layout converts
the checkpoint once into ``<tag>.to-<layout>`` beside it, built in a temporary directory and renamed
when complete; the original is only read. The conversion holds:

* the engine state, layout-free: every parameter's fp32 master weight and both Adam moments, whole and
  by HF name, one file per parameter (``params/``). DeepSpeed's universal-checkpoint converter
  (``deepspeed.checkpoint.ds_to_universal``) reads ZeRO-1/2/3 checkpoints of any data-parallel, AutoTP
  and pipeline layout into whole tensors; pipeline layer names become HF names here, and ZeRO-0 (torch's
  own AdamW state, which the converter does not read) is read here. The new engine is filled by the
  full-tensor writes of the V-cycle transitions (``LevelParams.write``: ``safe_set_full_fp32_param``,
  ``safe_set_full_optimizer_state``, TP blocks and pipeline stages handled there), at the saved Adam step
  count, so one loader serves every target, a pipeline stage or an AutoTP block included. DeepSpeed's own
  ``load_universal`` restores a ZeRO optimizer from the converter's files by the engine's own parameter
  names: it can't fill a ZeRO-0 engine (torch's optimizer) nor move between HF and pipeline-layer
  names. Where the engine state does not depend on the change (ZeRO-0 over another
  data-parallel size), DeepSpeed loads the original files as they are;
* what DeepSpeed does not know, per new rank (``extra_rank{r}.pt``): the large model's kept shards for
  interpolation, re-cut for the new world (each rank reads only its range of the old shards); SAT's
  state made layout-free: each unit's importance from the TP rank that holds it, averaged over the
  ranks that hold it (the data-parallel average the next selection computes anyway: the EMA is linear),
  the seen masks, the current selection, rate and generator. A pipeline stage takes its layers' rows.

Unchanged by construction: the V-cycle stage and the step, which is also the LORS position and the
data position. The sampler's batch at a step depends on the global batch only (micro-batch x
accumulation x data-parallel size), so with the same global batch the resumed run trains on the same
samples at every step. With another global batch, step s takes the s-th batch of the new size in the
same per-epoch permutation: samples of the current epoch may repeat or be skipped, and the epochs end
at other steps. The one-line message says which, and which ``optim.grad_accum`` keeps the batch.

What can't be converted is refused by :func:`check_resume` before any work, in one ConfigError.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from .. import checkpoint, runtime
from ..config import ConfigError, TrainConfig, zero_stage
from ..models import resolve_dtype
from .build import param_groups
from .transitions import MOMENTS, LevelParams, adam_step, init_adam_state

STATES = ("fp32",) + MOMENTS  # per parameter: the master weight and Adam's two moments


@dataclass(frozen=True)
class Layout:
    """How a run lies on its ranks: what a checkpoint records and a resume compares."""

    world: int
    dp: int
    tp: int
    pp: int
    zero_stage: int
    dtype: str  # "fp32" | "bf16": the model's weights (master weights and moments are fp32 either way)
    backend: str  # model.backend
    micro_batch_size: int
    grad_accum: int

    @classmethod
    def of(cls, cfg: TrainConfig, ds: dict, world: int, tp: int) -> Layout:
        pp = cfg.parallel.pp
        dtype = "bf16" if resolve_dtype(cfg.model.dtype) == torch.bfloat16 else "fp32"
        return cls(world, world // (pp * tp), tp, pp, zero_stage(ds), dtype, cfg.model.backend,
                   cfg.optim.micro_batch_size, cfg.optim.grad_accum)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    @property
    def engine(self) -> tuple:
        """What DeepSpeed's checkpoint files depend on."""
        return self.dp, self.tp, self.pp, self.zero_stage, self.dtype

    @property
    def slug(self) -> str:
        return f"dp{self.dp}-tp{self.tp}-pp{self.pp}-zero{self.zero_stage}-{self.dtype}"

    def describe(self) -> str:
        ranks = f"{self.world} rank" + ("s" if self.world != 1 else "")
        return f"{ranks} (dp{self.dp} tp{self.tp} pp{self.pp}, ZeRO-{self.zero_stage}, {self.dtype})"


def record(engine, layout: Layout) -> dict[str, Any]:
    """A checkpoint's ``layout.json``: the layout, the Adam step count and DeepSpeed's step counters.

    An engine of the HF backend that has not stepped yet (a V-cycle level just after a transition, with
    fresh moments) gets its AdamW state now, zero at step 0, which its first step would create alike:
    DeepSpeed's checkpoint of an optimizer without state holds no moments, which the universal converter
    needs (Megatron-backend checkpoints are not converted).
    """
    step = adam_step(engine.optimizer)
    if step == 0 and layout.backend == "hf":
        init_adam_state(engine.optimizer, 0)
    return {"layout": asdict(layout), "adam_step": step,
            "global_steps": engine.global_steps, "global_samples": engine.global_samples}


def _engine_portable(saved: Layout, current: Layout) -> bool:
    """DeepSpeed loads the saved files as they are: same layout, or ZeRO-0 (every data-parallel rank holds
    the whole model and optimizer state, rank 0 saves it) over another data-parallel size."""
    if saved.engine == current.engine:
        return True
    zero0 = saved.zero_stage == current.zero_stage == 0 and saved.dtype == current.dtype
    return zero0 and (saved.tp, saved.pp) == (current.tp, current.pp)


def check_resume(root: Path, current: Layout) -> Resume | None:
    """How the latest checkpoint under ``root`` resumes on ``current`` (None: there is none).

    Reads two small files and refuses, in one ConfigError naming what differs and what to set, what
    can't be converted; nothing is written.
    """
    tag = checkpoint.latest(root)
    if tag is None:
        return None
    rec = checkpoint.read_layout(root, tag)
    where = f"checkpoint {root / tag}"
    if rec is None:  # written before layouts were recorded: only the same layout resumes
        ranks = len(list((root / tag).glob("extra_rank*.pt")))
        if ranks != current.world:
            raise ConfigError(f"--resume: {where} records no layout (it predates elastic resume) and was written "
                              f"on {ranks} ranks, this run has {current.world}; resume it on {ranks} ranks with "
                              "the deepspeed.config and parallel.pp it was written with")
        return Resume(root, tag, current, None)
    saved = Layout(**rec["layout"])
    where += f" ({saved.describe()})"
    if saved.backend != current.backend:
        raise ConfigError(f"model.backend: {where} was written with model.backend={saved.backend}, this run has "
                          f"{current.backend}; set model.backend={saved.backend}")
    if saved.engine != current.engine or saved.world != current.world:
        if saved.backend == "megatron":
            raise ConfigError(f"parallel.tp: {where} was written with model.backend megatron, whose checkpoints "
                              f"resume only on their own layout, this run has {current.describe()}; run on "
                              f"{saved.world} ranks with parallel.tp={saved.tp} and a ZeRO-{saved.zero_stage} "
                              "deepspeed.config")
        if saved.zero_stage == 0 and (saved.tp > 1 or saved.pp > 1) and not _engine_portable(saved, current):
            raise ConfigError(f"deepspeed.config: {where} is a ZeRO-0 checkpoint with tensor or pipeline "
                              f"parallelism, which changes only its data-parallel size, this run has "
                              f"{current.describe()}; resume with a ZeRO-0 deepspeed.config, autotp_size={saved.tp}, "
                              f"parallel.pp={saved.pp} and model.dtype={saved.dtype} (write checkpoints under ZeRO-1 "
                              "to change more)")
    return Resume(root, tag, current, rec)


@dataclass
class Resume:
    """The checkpoint a run resumes from and the layout it resumes on."""

    root: Path
    tag: str
    current: Layout
    record: dict[str, Any] | None  # the checkpoint's layout.json; None: written before layouts were recorded

    @property
    def saved(self) -> Layout:
        return self.current if self.record is None else Layout(**self.record["layout"])

    @property
    def converts(self) -> bool:
        saved = self.saved
        return saved.engine != self.current.engine or saved.world != self.current.world

    @property
    def target(self) -> Path:
        return self.root / f"{self.tag}.to-{self.current.slug}"

    def load(self, engine, sat, stage) -> dict:
        """Collective. Load the checkpoint into ``engine`` (built at ``stage``'s level on this layout) and
        ``sat``, converting it first where the layout changed; returns this rank's kept shards."""
        if not self.converts:
            extra = checkpoint.load(engine, self.root, self.tag)
            sat.load_state_dict(extra["sat"])
            if self.saved.global_batch != self.current.global_batch and runtime.rank() == 0:
                print(f"resume: {self.tag} on its own layout; {self._data_note()}", flush=True)
            return extra["kept"]
        converted = self._convert(stage.config)
        if (self.target / "params").is_dir():
            _load_params(engine, stage.config, self.target / "params", self.record["adam_step"])
            engine.global_steps, engine.global_samples = self.record["global_steps"], self.record["global_samples"]
        else:
            checkpoint.load_engine(engine, self.root, self.tag)
        extra = checkpoint.load_extra(self.target, runtime.rank())
        sat.load_state_dict(_local_sat_state(extra["sat"], sat))
        if runtime.rank() == 0:
            print(f"resume: {self.tag} was written on {self.saved.describe()}, this run has "
                  f"{self.current.describe()}; converted into {self.target.name}: {'; '.join(converted)}; "
                  f"V-cycle stage {stage.index} (level {stage.level}), LORS and data continue at step "
                  f"{self.record_step}; {self._data_note()}", flush=True)
        return extra["kept"]

    @property
    def record_step(self) -> int:
        return checkpoint.read_run_state(self.root, self.tag)["step"]

    def _data_note(self) -> str:
        old, new = self.saved.global_batch, self.current.global_batch
        if old == new:
            return f"global batch {new} as before (the same samples at every step)"
        per_rank = self.current.micro_batch_size * self.current.dp
        keep = (f"set optim.grad_accum={old // per_rank} to keep it" if old % per_rank == 0 else
                f"make optim.micro_batch_size x optim.grad_accum x {self.current.dp} data-parallel ranks = {old} "
                "to keep it")
        return (f"global batch {old} -> {new}: from step {self.record_step} on the epoch's sample order is cut into "
                f"batches of {new}, so samples of this epoch may repeat or be skipped ({keep})")

    def _convert(self, config: LlamaConfig) -> list[str]:
        """Write ``self.target`` unless it exists (collective); returns what was converted, for the message."""
        rank, tmp = runtime.rank(), self.root / f".{self.target.name}.tmp"
        if not self.target.is_dir():
            error = None
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                try:
                    converted = [self._convert_engine(tmp / "params", config)
                                 if not _engine_portable(self.saved, self.current) else
                                 "weights and Adam moments from DeepSpeed's files as they are (ZeRO-0)"]
                except Exception as err:  # every rank raises, none waits in a barrier
                    error = f"resume: converting {self.root / self.tag} failed: {type(err).__name__}: {err}"
                    shutil.rmtree(tmp, ignore_errors=True)
            error = _from_rank0(error)
            if error is not None:
                raise RuntimeError(error)
            torch.save(self._extra_for(rank), tmp / f"extra_rank{rank}.pt")
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                world, old = self.current.world, self._old_extras()[0]
                if any(old["kept"].values()):
                    converted.append(f"kept shards re-cut for {world} rank" + "s" * (world != 1))
                if old["sat"] is not None:
                    converted.append("SAT state merged over the saved ranks")
                shutil.copy2(self.root / self.tag / "run_state.json", tmp / "run_state.json")
                rec = {"layout": asdict(self.current), "adam_step": self.record["adam_step"],
                       "global_steps": self.record["global_steps"], "global_samples": self.record["global_samples"],
                       "converted_from": {"tag": self.tag, "layout": self.record["layout"]}, "converted": converted}
                (tmp / checkpoint.LAYOUT).write_text(json.dumps(rec))
                os.rename(tmp, self.target)
            if dist.is_initialized():
                dist.barrier()
        return checkpoint.read_layout(self.root, self.target.name)["converted"]

    def _old_extras(self) -> list[dict]:
        """Every saved rank's extra tensors, memory-mapped: a rank reads only the ranges it takes."""
        src = self.root / self.tag
        return [torch.load(src / f"extra_rank{r}.pt", map_location="cpu", mmap=True, weights_only=False)
                for r in range(self.saved.world)]

    def _extra_for(self, rank: int) -> dict:
        old = self._old_extras()
        kept = {level: {name: reshard([o["kept"][level][name] for o in old], rank, self.current.world)
                        for name in shards} for level, shards in old[0]["kept"].items()}
        return {"kept": kept, "sat": merge_sat_states([o["sat"] for o in old], self.saved.tp)}

    def _convert_engine(self, out: Path, config: LlamaConfig) -> str:
        """The layout-free engine state (see the module docstring), checked against ``config``'s parameters."""
        src, saved = self.root / self.tag, self.saved
        if saved.zero_stage == 0:
            states, how = _zero0_states(src, config), "read from ZeRO-0's model file"
        else:
            states, how = _universal_states(src, out.parent / ".universal", config.num_hidden_layers), \
                "DeepSpeed universal checkpoint"
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
        out.mkdir()
        for name, state in states:
            if name not in shapes or any(state[k].numel() != shapes[name].numel() for k in STATES):
                raise ValueError(f"{name} ({state['fp32'].numel()} elements) is not a parameter of the level's "
                                 f"model ({shapes.get(name)}): the model config differs from the checkpoint's")
            torch.save({k: state[k].reshape(shapes[name]) for k in STATES}, out / f"{name}.pt")
        missing = sorted(set(shapes) - {p.stem for p in out.iterdir()})
        if missing:
            raise ValueError(f"the checkpoint has no {', '.join(missing)}: the model config differs from the "
                             "checkpoint's")
        return f"weights and Adam moments of {len(shapes)} parameters at Adam step {self.record['adam_step']} ({how})"


def _from_rank0(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reshard(parts: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """``rank``'s ``params.shard_of(full, rank, world)`` of the flat tensor whose shards of another world
    are ``parts`` (in rank order), reading only the ranges that overlap it."""
    numel = sum(p.numel() for p in parts)
    size = -(-numel // world)
    start, stop = min(numel, rank * size), min(numel, (rank + 1) * size)
    pieces, offset = [], 0
    for part in parts:
        lo, hi = max(start, offset), min(stop, offset + part.numel())
        if lo < hi:
            pieces.append(part[lo - offset:hi - offset])
        offset += part.numel()
    return torch.cat(pieces) if pieces else parts[0].new_empty(0)


def merge_sat_states(states: list[dict | None], tp: int) -> dict | None:
    """One layout-free SAT state from every saved rank's ``SATController.state_dict()`` (in rank order).

    A rank's tracker covers its pipeline stage's layers and records its TP block's units (TP rank =
    rank % tp: TP groups are consecutive ranks; blocks are the contiguous equal splits AutoTP makes).
    Each unit's score is the mean over the ranks that hold it, which is the data-parallel average the
    next selection takes after assembling the TP blocks; seen masks come from the holders too. The
    selection, rate and generator are the same on every rank (a stage holds its layers' selection).
    """
    if states[0] is None:
        return None
    trackers = [s["tracker"] for s in states]
    layers = sorted({layer for t in trackers for layer in t["layers"]})
    score, seen = {}, {}
    for kind, first in trackers[0]["score"].items():
        n = first.shape[1]
        total, count = torch.zeros(len(layers), n), torch.zeros(len(layers), n)
        held_seen = torch.zeros(len(layers), n, dtype=torch.bool)
        for rank, t in enumerate(trackers):
            rows = torch.tensor([layers.index(layer) for layer in t["layers"]])
            block = slice(rank % tp * n // tp, (rank % tp + 1) * n // tp)
            total[rows, block] += t["score"][kind][:, block].cpu().float()
            count[rows, block] += 1
            held_seen[rows, block] |= t["seen"][kind][:, block].cpu()
        score[kind], seen[kind] = total / count, held_seen
    tracker = {"layers": layers, "metric": trackers[0]["metric"], "score": score, "seen": seen,
               "generator": trackers[0]["generator"]}
    return {"tracker": tracker, "rate": states[0]["rate"],
            "keep_heads": {k: v for s in states for k, v in s["keep_heads"].items()},
            "keep_channels": {k: v for s in states for k, v in s["keep_channels"].items()}}


def _local_sat_state(state: dict | None, sat) -> dict | None:
    """The rows of ``state`` (see :func:`merge_sat_states`) for the layers ``sat`` scores on this rank."""
    if state is None:
        return None
    layers, t = sat.tracker.layers, state["tracker"]
    rows = [t["layers"].index(layer) for layer in layers]
    tracker = {**t, "layers": layers, "score": {k: v[rows] for k, v in t["score"].items()},
               "seen": {k: v[rows] for k, v in t["seen"].items()}}
    return {"tracker": tracker, "rate": state["rate"],
            "keep_heads": {k: v for k, v in state["keep_heads"].items() if k in layers},
            "keep_channels": {k: v for k, v in state["keep_channels"].items() if k in layers}}


def hf_name(name: str, num_layers: int) -> str:
    """A parameter's HF name from a PipelineModule's (``ds_accel.parallel.pipeline.layer_specs``: layer 0
    the embedding, 1..L the decoder blocks, L+1 the final norm, L+2 the head; a tied embedding/head lives
    in ``tied_modules``); HF names pass unchanged."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        return "model.embed_tokens." + rest.partition(".")[2]
    if not head.isdigit():
        return name
    index = int(head)
    prefix = {0: "model.embed_tokens.", num_layers + 1: "model.norm.", num_layers + 2: "lm_head."}
    return prefix.get(index, f"model.layers.{index - 1}.") + rest


def _universal_states(src: Path, work: Path, num_layers: int) -> Iterator[tuple[str, dict]]:
    """(HF name, {fp32, exp_avg, exp_avg_sq}) of every trained parameter of a ZeRO-1/2/3 checkpoint, read
    by DeepSpeed's universal-checkpoint converter into ``work`` (its ``latest_universal`` lands there too)."""
    from deepspeed.checkpoint import ds_to_universal

    out = work / src.name
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # progress bars, not for the user
        ds_to_universal.main(args)
    for param in sorted((out / "zero").iterdir()):
        if (param / "exp_avg.pt").is_file():  # not a tied head's copy of the embedding (model state only)
            yield hf_name(param.name, num_layers), {key: _tensor(torch.load(param / f"{key}.pt")) for key in STATES}
    shutil.rmtree(work)


def _tensor(saved: torch.Tensor | dict) -> torch.Tensor:
    """A universal file's tensor: ZeRO-1/2 store {"param": tensor, ...}, ZeRO-3 the flat tensor itself."""
    return saved["param"] if isinstance(saved, dict) else saved


def _zero0_states(src: Path, config: LlamaConfig) -> Iterator[tuple[str, dict]]:
    """ZeRO-0 (tp = pp = 1): DeepSpeed saves the model's state dict and torch's AdamW state, whose parameters
    are numbered in the order of ``build.param_groups``; in bf16 its unfused mixed-precision optimizer wraps
    that state and keeps the fp32 master of each parameter (``fp32_groups``), in fp32 the model is the master."""
    saved = torch.load(src / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]
    wrapper = saved["optimizer"]
    optim = wrapper.get("optimizer_state_dict", wrapper)
    ids = [i for group in optim["param_groups"] for i in group["params"]]
    if len(ids) != len(order):
        raise ValueError(f"the optimizer has {len(ids)} parameters, the level's model {len(order)}: the model "
                         "config differs from the checkpoint's")
    masters = [p for group in wrapper["fp32_groups"] for p in group] if "fp32_groups" in wrapper else None
    for k, (i, name) in enumerate(zip(ids, order)):
        fp32 = masters[k] if masters is not None else saved["module"][name]
        yield name, {"fp32": fp32.float(), **{key: optim["state"][i][key] for key in MOMENTS}}


def _load_params(engine, config: LlamaConfig, directory: Path, step: int) -> None:
    """Fill ``engine`` from the layout-free state: each parameter's master and model copy and both moments
    where this rank keeps them, one parameter at a time, at Adam step ``step`` (collective)."""
    view = LevelParams.of(engine.module, config, engine.optimizer)
    init_adam_state(engine.optimizer, step)
    for name in view.shapes:
        state = torch.load(directory / f"{name}.pt", map_location=runtime.device()) if name in view.local else {}
        for key in STATES:
            view.write(name, state.get(key), None if key == "fp32" else key)

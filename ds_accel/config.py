"""Typed run configuration, loaded from YAML/JSON and validated before any work starts.

Every field is declared once, with its default and meaning, so the README's config reference and
the error messages come from the same place. A user mistake raises :class:`ConfigError`, whose
message names the field and the fix; the CLI prints it as one line, without a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = Path(__file__).parent / "configs"  # bundled run configs: default, dense, bench


def config_path(name: str | None) -> str | None:
    """A config file path, or the name of one shipped with the package (default, dense, ...)."""
    if name is None or Path(name).is_file():
        return name
    bundled = PACKAGE_CONFIGS / f"{name}.yaml"
    return str(bundled) if bundled.is_file() else name



class ConfigError(ValueError):
    """A user mistake in the configuration: one line naming the field and the fix."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, monitor/ (TensorBoard, CSV), loss.png, export/
    seed: int = 0  # model init, data order, SAT random metric and sample selection
    total_steps: int = 200  # optimizer steps over the whole run (all V-cycle levels together)
    eval_every: int = 50  # validation loss every N steps (and at the end)
    eval_batches: int = 8  # validation micro-batches per evaluation
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10  # metrics row every N steps
    export: bool = True  # write a HF directory (save_pretrained) at the end
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # .txt/.jsonl/.json files or a saved dataset dir; empty: the bundled `corpus`
    corpus: str = "kjv"  # bundled corpus when train_files is empty: kjv (King James Bible) | stdlib (this Python's standard-library .py sources)
    text_field: str = "text"  # column holding the text in JSON/JSONL/saved datasets
    seq_len: int = 128  # tokens per packed training block
    val_fraction: float = 0.05  # share of blocks held out for validation
    tokenizer: str | None = None  # dir with tokenizer.model (Llama-2's, say); None: train a sentencepiece model on the corpus
    vocab_size: int = 2000  # size of the trained sentencepiece model (when tokenizer is None)
    max_chars: int = 0  # use only the first N characters of the corpus (0: all); for quick runs and tests


@dataclass
class ModelConfig:
    preset: str = "small"  # tiny | mini | small | base | llama2-7b | llama2-13b | llama2-70b (ignored with pretrained)
    pretrained: str | None = None  # local HF Llama checkpoint dir, loaded with from_pretrained
    tie_word_embeddings: bool | None = None  # override the preset's choice
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16
    backend: str = "hf"  # hf (transformers' LlamaForCausalLM) | megatron (Megatron-core GPTModel, Megatron TP: parallel.tp; pip install -e ".[megatron]")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of level 1
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up steps at the start of the run
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only; norms are not decayed)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon (Llama-2's pretraining used 1e-5)
    grad_clip: float = 1.0  # DeepSpeed gradient_clipping (0 disables)
    micro_batch_size: int = 8  # per rank; fills train_micro_batch_size_per_gpu "auto"
    grad_accum: int = 1  # fills gradient_accumulation_steps "auto"


@dataclass
class MultiLevelConfig:
    enabled: bool = False  # train with the V-cycle (coalesce, train small, de-coalesce + interpolate)
    levels: int = 2  # V-cycle depth; level 1 is the full model
    width_factor: int = 2  # hidden, heads and MLP divided by this per level (1: keep width)
    depth_factor: int = 2  # layers divided by this per level (1: keep depth)
    pairing: str = "half"  # half (i with i+n/2) | adjacent (2i with 2i+1)
    step_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.65])  # per V-cycle stage, down then up (2*levels-1 values, sum 1; default: the V-cycle study's best)
    lr_scale: list[float] = field(default_factory=lambda: [1.0, 2.0])  # peak LR multiplier per level
    lr_schedule: str = "authors"  # authors: stage 1 all warm-up, later stages decay from the level's peak to 0 (the authors' code) | stage: warm-up/decay to optim.min_lr_ratio afresh per stage | run: one schedule over the run
    lr_decay: str = "auto"  # decay shape: cosine | linear | auto (linear for authors, cosine otherwise)
    transition_warmup: int = 0  # linear warm-up steps at the start of every stage after a transition (authors/stage)
    alpha: float = 0.5  # interpolation weight of the de-coalesced model
    optimizer_policy: str = "fresh"  # fresh: new AdamW state at each transition (the authors' code) | transfer: Adam moments mapped through the operators


@dataclass
class SATConfig:
    enabled: bool = False  # omit unimportant heads/channels per step (sliced GEMMs), LORS back to dense
    omission_rate: float = 0.5  # share of heads and MLP channels omitted in stage 1
    schedule: str = "ladder"  # ladder (LORS) | constant | linear
    stage1_fraction: float = 0.5  # LORS: share of steps at the constant rate
    rungs: int = 4  # LORS: equal steps down to dense, the last one dense
    metric: str = "activation"  # importance: activation (mean |activation|) | weight (L2 norm of the unit's output-projection weights) | wanda (|W| x input norm) | random (control)
    selection: str = "topk"  # topk (the most important units) | sample (drawn without replacement, probability proportional to importance)
    ema_decay: float = 0.9  # importance moving average
    reselect_every: int = 1  # re-select heads/channels every N steps
    granularity: str = "head"  # head (query heads) | kv_group (whole GQA groups)
    heads: bool = True  # omit attention heads
    channels: bool = True  # omit MLP channels
    tp_selection: str = "balanced"  # under TP: balanced (same count per TP rank, no waiting) | global (top-k)
    optimizer_policy: str = "adam"  # adam (stock AdamW sees the omitted rows' zero gradient) | freeze (omitted weights and Adam moments unchanged by the step)


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages (DeepSpeed PipelineModule; ZeRO-0/1 only); TP is the DS config's autotp_size
    tp: int = 1  # Megatron tensor-parallel ranks per group (model.backend megatron only; HF models: the DS config's autotp_size)


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero1.json"  # DeepSpeed JSON; "auto" values are filled from optim/model


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    multilevel: MultiLevelConfig = field(default_factory=MultiLevelConfig)
    sat: SATConfig = field(default_factory=SATConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.corpus": ("kjv", "stdlib"),
    "model.dtype": ("auto", "fp32", "bf16"),
    "model.backend": ("hf", "megatron"),
    "multilevel.pairing": ("half", "adjacent"),
    "multilevel.optimizer_policy": ("fresh", "transfer"),
    "multilevel.lr_schedule": ("authors", "stage", "run"),
    "multilevel.lr_decay": ("auto", "cosine", "linear"),
    "sat.schedule": ("ladder", "constant", "linear"),
    "sat.metric": ("activation", "weight", "wanda", "random"),
    "sat.selection": ("topk", "sample"),
    "sat.granularity": ("head", "kv_group"),
    "sat.tp_selection": ("balanced", "global"),
    "sat.optimizer_policy": ("freeze", "adam"),
}


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config dict (0 without a ``zero_optimization`` section)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    """The DeepSpeed config puts the optimizer state in host memory or on NVMe (ZeRO-Offload)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Coerce ints (and YAML's unparsed exponents like "1e-3") to floats where a float is declared;
    reject everything else that does not fit."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if hint in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(path, value, inner[0])
    if hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}; write it as [a, b, ...]")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; known keys here are {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, path)
        else:
            kwargs[name] = _check_type(path, value, hints[name])
    return cls(**kwargs)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Semantic checks that need more than one field; the model-shape checks run in the trainer
    once the model config is known (``trainer._check_layout``: ``multilevel.vcycle.level_configs``,
    ``parallel.pipeline.validate_layout``, ``parallel.tensor.validate_tp``)."""
    for path, choices in _CHOICES.items():
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in choices, f"{path}: {value!r} is not one of {', '.join(choices)}")
    r, d, o, m, s = cfg.run, cfg.data, cfg.optim, cfg.multilevel, cfg.sat
    for path, value in [("run.total_steps", r.total_steps), ("run.eval_every", r.eval_every),
                        ("run.eval_batches", r.eval_batches), ("run.log_every", r.log_every),
                        ("run.keep_checkpoints", r.keep_checkpoints), ("data.seq_len", d.seq_len),
                        ("data.vocab_size", d.vocab_size), ("optim.micro_batch_size", o.micro_batch_size),
                        ("optim.grad_accum", o.grad_accum), ("multilevel.levels", m.levels),
                        ("multilevel.width_factor", m.width_factor), ("multilevel.depth_factor", m.depth_factor),
                        ("sat.rungs", s.rungs), ("sat.reselect_every", s.reselect_every)]:
        _require(value >= 1, f"{path}: must be >= 1, got {value}")
    _require(d.vocab_size >= 384, f"data.vocab_size: must be >= 384 (256 byte-fallback pieces plus the "
                                  f"corpus' characters), got {d.vocab_size}")
    _require(r.save_every >= 0, f"run.save_every: must be >= 0 (0 saves only at the end), got {r.save_every}")
    _require(0 < d.val_fraction < 0.5, f"data.val_fraction: must be in (0, 0.5), got {d.val_fraction}")
    _require(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    _require(o.eps > 0, f"optim.eps: must be > 0, got {o.eps}")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    _require(0 <= o.warmup_steps < r.total_steps,
             f"optim.warmup_steps: must be in [0, run.total_steps), got {o.warmup_steps}")
    _require(0 <= s.omission_rate < 1, f"sat.omission_rate: must be in [0, 1), got {s.omission_rate}")
    _require(0 < s.stage1_fraction <= 1, f"sat.stage1_fraction: must be in (0, 1], got {s.stage1_fraction}")
    _require(0 <= s.ema_decay < 1, f"sat.ema_decay: must be in [0, 1), got {s.ema_decay}")
    _require(0 <= m.alpha <= 1, f"multilevel.alpha: must be in [0, 1], got {m.alpha}")
    _require(cfg.parallel.pp >= 1, f"parallel.pp: must be >= 1, got {cfg.parallel.pp}")
    _require(cfg.parallel.tp >= 1, f"parallel.tp: must be >= 1, got {cfg.parallel.tp}")
    if cfg.model.backend == "megatron":
        _require(_installed("megatron.core"), "model.backend: megatron needs megatron-core; install it with "
                                             "pip install -e \".[megatron]\"")
        _require(cfg.parallel.pp == 1, "parallel.pp: pipeline stages are not supported with model.backend megatron; "
                                       "use parallel.pp=1 (its tensor parallelism is parallel.tp)")
        _require(m.optimizer_policy == "fresh", "multilevel.optimizer_policy: model.backend megatron maps weights, not "
                                                "Adam moments, across levels; use fresh")
    else:
        _require(cfg.parallel.tp == 1, "parallel.tp: Megatron tensor parallelism needs model.backend megatron; for HF "
                                       "models set tensor_parallel.autotp_size in the DeepSpeed config (ds_configs/tp2.json)")
    if m.enabled:
        n_stages = 2 * m.levels - 1
        _require(m.levels >= 2, "multilevel.levels: must be >= 2 when multilevel.enabled (1 is dense training)")
        _require(len(m.step_fractions) == n_stages,
                 f"multilevel.step_fractions: {m.levels} levels make a V-cycle of {n_stages} stages "
                 f"(down then up); give {n_stages} fractions, got {len(m.step_fractions)}")
        _require(abs(sum(m.step_fractions) - 1) < 1e-6 and min(m.step_fractions) > 0,
                 f"multilevel.step_fractions: must be positive and sum to 1, got {m.step_fractions}")
        _require(len(m.lr_scale) == m.levels,
                 f"multilevel.lr_scale: give one multiplier per level ({m.levels}), got {len(m.lr_scale)}")
        _require(m.width_factor > 1 or m.depth_factor > 1,
                 "multilevel.width_factor/depth_factor: at least one must be > 1, else no level is smaller")
        _require(m.transition_warmup >= 0, f"multilevel.transition_warmup: must be >= 0, got {m.transition_warmup}")
        _require(m.transition_warmup == 0 or m.lr_schedule != "run",
                 "multilevel.transition_warmup: lr_schedule run is one schedule over the whole run; use "
                 "lr_schedule authors or stage to warm up after transitions")
    _require(not d.train_files or d.corpus == "kjv",
             f"data.corpus: {d.corpus!r} applies only when data.train_files is empty; remove one of them")
    for path in d.train_files:
        _require(Path(path).exists(), f"data.train_files: {path} does not exist; give an existing file or directory")
    if d.tokenizer is not None:
        _require((Path(d.tokenizer) / "tokenizer.model").is_file() or (Path(d.tokenizer) / "tokenizer.json").is_file(),
                 f"data.tokenizer: {d.tokenizer} holds no tokenizer.model/tokenizer.json; point it at a tokenizer dir")
    if cfg.model.pretrained is not None:
        _require((Path(cfg.model.pretrained) / "config.json").is_file(),
                 f"model.pretrained: {cfg.model.pretrained} has no config.json; point it at a HF checkpoint dir")
    ds_path = Path(cfg.deepspeed.config)
    if not ds_path.is_file() and (REPO_ROOT / ds_path).is_file():
        cfg.deepspeed.config = str(REPO_ROOT / ds_path)  # the repo's ds_configs/ from any working directory
    _require(Path(cfg.deepspeed.config).is_file(),
             f"deepspeed.config: {ds_path} not found; use one of ds_configs/*.json")
    return cfg


def from_dict(data: dict[str, Any]) -> TrainConfig:
    return validate(_build(TrainConfig, data, ""))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` pairs from the command line; values parse as YAML (numbers, lists, null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        _require(bool(sep) and "." in key, f"--set {item}: write it as section.key=value, e.g. run.total_steps=50")
        section, name = key.split(".", 1)
        data.setdefault(section, {})
        _require(isinstance(data[section], dict), f"{section}: expected a mapping of fields")
        data[section][name] = yaml.safe_load(raw)
    return data


def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML or JSON file (None: all defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        _require(p.is_file(), f"--config: {path} not found; pass a YAML or JSON file (see configs/ in the package)")
        try:
            data = (json.loads if p.suffix == ".json" else yaml.safe_load)(p.read_text()) or {}
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            raise ConfigError(f"--config: {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    return from_dict(apply_overrides(data, list(overrides)))

"""The benchmark's two scenarios and how their runs are laid out.

* ``scratch``: a randomly initialised model trained on the KJV (``configs/bench.yaml``).
* ``cpt`` (continual pretraining, the project's purpose): the base model pretrained on the KJV
  (:mod:`.base`) continues on the Python standard library's sources (``data.corpus: stdlib``) with the
  base's own tokenizer (``configs/bench_cpt.yaml``); forgetting is the base corpus' validation loss
  after the run.

Every method runs with every seed (``run.seed``: data order and SAT's random draws; the base model is
the same). Two views, each run in its own process:

* equal compute (the headline): dense trains ``run.total_steps`` steps; every other method trains the
  step count at which its own schedule spends dense's FLOPs (:func:`ds_accel.budget.steps_for_budget`);
* equal steps: the methods in :data:`EQUAL_STEPS` train dense's step count: SAT against dense, and SAT's
  two optimizer policies against each other (``sat-freeze`` runs in this view only). The other methods
  are compared at equal compute only: a benchmark of 3 seeds has to fit in about 90 minutes on 2 cores.

Dense's run serves both views.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import budget
from ..config import PACKAGE_CONFIGS, ConfigError, from_dict
from .base import pretrained_base
from .runs import merge, run_method

SAT = {"enabled": True}
METHODS: dict[str, dict[str, Any]] = {
    "dense": {},
    "sat": {"sat": SAT},  # LORS, activation importance, top-k: the defaults
    "sat-random": {"sat": {**SAT, "metric": "random"}},  # the control
    "vcycle": {"multilevel": {"enabled": True}},
    "vcycle+sat": {"multilevel": {"enabled": True}, "sat": SAT},
    "sat-weight": {"sat": {**SAT, "metric": "weight"}},
    "sat-wanda": {"sat": {**SAT, "metric": "wanda"}},
    "sat-sample": {"sat": {**SAT, "selection": "sample"}},
    "sat-freeze": {"sat": {**SAT, "optimizer_policy": "freeze"}},  # the other optimizer policy (default: adam)
}
SCENARIO_METHODS = {
    "cpt": list(METHODS),
    "scratch": ["dense", "vcycle", "sat", "vcycle+sat"],
}
# equal steps: is SAT within 1% of dense, and do its two optimizer policies differ (same steps, same cost)?
EQUAL_STEPS = ("dense", "sat", "sat-freeze")
EQUAL_STEPS_ONLY = ("sat-freeze",)  # it costs what SAT costs per step: equal compute would add nothing
VIEWS = ("equal_compute", "equal_steps")
SOURCE_EVAL_BLOCKS = 128  # base-corpus validation blocks scored after a CPT run (forgetting)

# --quick: the tiny preset on corpus slices, a short base pretraining and short runs
QUICK = {
    "scratch": {"run": {"total_steps": 40, "eval_every": 10}, "model": {"preset": "tiny"},
                "data": {"max_chars": 1_000_000}, "optim": {"warmup_steps": 5}},
    "cpt": {"run": {"total_steps": 40, "eval_every": 10, "eval_batches": 8}, "data": {"max_chars": 1_000_000},
            "optim": {"warmup_steps": 5}},
    "base": {"run": {"total_steps": 200, "eval_every": 50, "save_every": 0}, "model": {"preset": "tiny"},
             "data": {"max_chars": 1_500_000}, "optim": {"warmup_steps": 20}},
}


def load_config(name: str) -> dict:
    return yaml.safe_load((PACKAGE_CONFIGS / f"{name}.yaml").read_text())


@dataclass
class Scenario:
    """A scenario's run config (every method's overlay goes on top) and, for CPT, its base model."""

    name: str
    config: dict
    methods: list[str]
    base_dir: Path | None = None  # CPT: the base model's run dir (export/ holds the HF model and tokenizer)
    base_s: float = 0.0  # wall-clock of pretraining the base in this invocation (0: cached)

    @classmethod
    def build(cls, name: str, quick: bool = False, preset: str | None = None, base: str | None = None,
              methods: list[str] | None = None) -> Scenario:
        """The scenario's config; for ``cpt`` the base model is pretrained first if not cached (or ``base``,
        a HF Llama directory with its tokenizer, is used as it is)."""
        config = load_config("bench" if name == "scratch" else "bench_cpt")
        if quick:
            config = merge(config, QUICK[name])
        chosen = SCENARIO_METHODS[name] if methods is None else ["dense"] + [m for m in methods if m != "dense"]
        unknown = sorted(set(chosen) - set(SCENARIO_METHODS[name]))
        if unknown:
            raise ConfigError(f"--methods: {', '.join(unknown)} not in the {name} scenario "
                             f"({', '.join(SCENARIO_METHODS[name])})")
        if name == "scratch":
            if preset:
                config = merge(config, {"model": {"preset": preset}})
            return cls(name, config, chosen)
        started, base_dir = time.perf_counter(), None
        if base is None:
            base_config = load_config("bench_cpt_base")
            base_config = merge(base_config, QUICK["base"]) if quick else base_config
            if preset:
                base_config = merge(base_config, {"model": {"preset": preset}})
            base_dir = pretrained_base(merge(base_config, {"run": {"progress": False}}))
            model_dir = base_dir / "export"
        else:
            model_dir = Path(base)
        config = merge(config, {"model": {"pretrained": str(model_dir)}, "data": {"tokenizer": str(model_dir)}})
        return cls(name, config, chosen, base_dir, time.perf_counter() - started if base is None else 0.0)

    def method_config(self, method: str, seed: int, steps: int | None = None) -> dict:
        """The run config of ``method`` with ``seed``, over ``steps`` steps (default the scenario's)."""
        cfg = merge(merge(self.config, METHODS[method]), {"run": {"seed": seed, "progress": False}})
        if steps is not None:
            cfg = merge(cfg, {"run": {"total_steps": steps}})
        if self.name == "cpt":
            cfg = merge(cfg, {"run": {"export": True}})  # the forgetting evaluation reads the exported model
        return cfg

    def plan(self) -> dict[str, dict[str, int]]:
        """{view: {method: steps}}: every method's step count in each view it runs in."""
        dense = from_dict(self.method_config("dense", 0))
        vocab = self.vocab_size()
        spend = budget.run_flops(dense, vocab)
        steps = dense.run.total_steps
        views: dict[str, dict[str, int]] = {"equal_compute": {}, "equal_steps": {}}
        for method in self.methods:
            cfg = from_dict(self.method_config(method, 0))
            if method not in EQUAL_STEPS_ONLY:
                views["equal_compute"][method] = steps if method == "dense" else \
                    budget.steps_for_budget(cfg, vocab, spend)
            if method in EQUAL_STEPS:
                views["equal_steps"][method] = steps
        return views

    def source_blocks(self):
        """The base corpus' (KJV) validation blocks under the base's tokenizer, and the micro-batch size:
        the held-out split of the base's own pretraining (same seq_len and val_fraction)."""
        from ..config import DataConfig
        from ..data import prepare

        cfg = from_dict(self.config)
        kjv = DataConfig(corpus="kjv", tokenizer=cfg.data.tokenizer, seq_len=cfg.data.seq_len,
                         val_fraction=cfg.data.val_fraction)
        return prepare(kjv).val[:SOURCE_EVAL_BLOCKS], cfg.optim.micro_batch_size

    def base_record(self, out: Path) -> dict[str, Any]:
        """The base model's losses before continual pretraining (the trainer's target-domain validation
        blocks; the base corpus'), and, when it was pretrained here, its curve, config and hash (copied to
        ``out``) and size."""
        from transformers import LlamaConfig

        from ..data import prepare
        from ..models import count_params

        cfg = from_dict(self.config)
        model_dir, micro = Path(cfg.model.pretrained), cfg.optim.micro_batch_size
        target = prepare(cfg.data).val[:cfg.run.eval_batches * micro]
        record = {"model_dir": str(model_dir), "target_val_loss": val_loss(model_dir, target, micro),
                  "source_val_loss": val_loss(model_dir, *self.source_blocks()),
                  "params": count_params(LlamaConfig.from_pretrained(model_dir))}
        if self.base_dir is not None:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "loss.png", "config.yaml", "result.json"):
                shutil.copy(self.base_dir / name, out / name)
            result = json.loads((self.base_dir / "result.json").read_text())
            record.update(config_hash=self.base_dir.name, cache_dir=str(self.base_dir), tokens=result["tokens"],
                          tokens_per_param=result["tokens"] / record["params"], steps=result["step"],
                          pretrain_val_loss=result["val_loss"], pretrain_wall_s=result["wall_s"])
        return record

    def vocab_size(self) -> int:
        from ..data import load_tokenizer, prepare

        data = from_dict(self.config).data
        return len(load_tokenizer(data.tokenizer)) if data.tokenizer else prepare(data).vocab_size


def run_dir_name(method: str, seed: int, steps: int, dense_steps: int) -> str:
    """Runs at dense's step count are shared by both views; the others are named by their step count."""
    return f"{method}/seed{seed}" + ("" if steps == dense_steps else f"_steps{steps}")


def execute(scenario: Scenario, seeds: list[int], out: Path, reuse: bool = False) -> dict[str, Any]:
    """Run every (seed, method, view) of the plan, seed by seed (so machine drift spreads over methods);
    returns {"plan", "runs": {view: {method: [run per seed]}}, "runs_s"}."""
    plan = scenario.plan()
    dense_steps = plan["equal_compute"]["dense"]
    source = scenario.source_blocks() if scenario.name == "cpt" else None
    done: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, list]] = {view: {m: [] for m in plan[view]} for view in VIEWS}
    started = time.perf_counter()
    for seed in seeds:
        for method in scenario.methods:
            for view in VIEWS:
                if method not in plan[view]:
                    continue
                steps = plan[view][method]
                name = run_dir_name(method, seed, steps, dense_steps)
                if name not in done:
                    done[name] = _one_run(scenario, method, seed, steps, out, name, source, reuse)
                runs[view][method].append({**done[name], "seed": seed})
    return {"plan": plan, "runs": runs, "runs_s": time.perf_counter() - started}


def _one_run(scenario: Scenario, method: str, seed: int, steps: int, out: Path, name: str,
             source, reuse: bool) -> dict[str, Any]:
    """Train (or reuse) one run; CPT runs are then scored on the base corpus, and the weights dropped."""
    started = time.perf_counter()
    run = run_method(name, scenario.method_config(method, seed, steps), out, reuse)
    r, run_dir = run["result"], run["run_dir"]
    if source is not None and "source_val_loss" not in r:
        r["source_val_loss"] = val_loss(run_dir / "export", *source)
        (run_dir / "result.json").write_text(json.dumps(r, indent=1))
    for heavy in ("checkpoints", "export"):  # the bench keeps curves and results, not weights
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    return {"steps": r["step"], "final_val_loss": r["val_loss"], "source_val_loss": r.get("source_val_loss"),
            "flops": r["flops"], "wall_s": r["wall_s"], "tokens": r["tokens"], "peak_mem_mb": r["peak_mem_mb"],
            "process_s": time.perf_counter() - started, "curve": [list(point) for point in run["curve"]]}


def val_loss(model_dir: Path, blocks, micro_batch_size: int) -> float:
    """Mean next-token loss of a HF Llama directory over ``blocks``, micro-batch by micro-batch (as the
    trainer evaluates), in float32 on the CPU."""
    import torch

    from ..engine.export import load_exported

    model = load_exported(model_dir).eval()
    with torch.no_grad():
        losses = [model(input_ids=x, labels=x, use_cache=False).loss.item() for x in blocks.split(micro_batch_size)]
    return sum(losses) / len(losses)

"""``ds-accel bench``: dense, V-cycle, SAT and SAT's variants, with seeds, at equal compute and equal steps.

Two scenarios (:mod:`.scenarios`): ``cpt``, continual pretraining of a base model pretrained on the KJV
(:mod:`.base`, cached) on the Python standard library's sources; ``scratch``, a random initialisation
trained on the KJV. Every run is its own process (:mod:`.runs`); the figures are means and ranges over
seeds, paired with dense's run of the same seed (:mod:`.report`). Each scenario writes
``results.json``, ``results.md`` and ``loss_vs_cost*.png``, and CPT the base model's curve (``base/``).
``--step-only`` runs the SAT step micro-benchmark (:mod:`ds_accel.step_bench`) instead.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from .. import step_bench
from ..runtime import usable_cores
from .report import markdown, plot, summarize
from .runs import cost_to_reach, run_method
from .scenarios import METHODS, SCENARIO_METHODS, Scenario, execute

SCENARIOS = ("cpt", "scratch")


def _machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {usable_cores()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def run_scenario(name: str, args, out: Path) -> dict:
    started = time.perf_counter()
    methods = args.methods.split(",") if args.methods else None
    scenario = Scenario.build(name, args.quick, args.size, args.base, methods)
    seeds = list(range(args.seeds))
    out.mkdir(parents=True, exist_ok=True)
    extra: dict = {"machine": _machine()}
    if name == "cpt":
        extra["base"] = scenario.base_record(out / "base")
    executed = execute(scenario, seeds, out, reuse=args.reuse)
    extra["timing_s"] = {"base_pretraining": scenario.base_s, "runs": executed["runs_s"],
                         "total": time.perf_counter() - started}
    summary = summarize(name, seeds, executed, extra)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    cfg = scenario.config
    if name == "cpt":
        base = scenario.base_dir.name if scenario.base_dir else cfg["model"]["pretrained"]
        what = f"base {base} continued on data.corpus {cfg['data']['corpus']}"
    else:
        what = f"preset {cfg['model']['preset']} on the KJV"
    header = (f"ds-accel bench --scenario {name}{' --quick' if args.quick else ''}: {what}, dense "
              f"{summary['steps']['equal_compute']['dense']} steps, on {extra['machine']}")
    table = markdown(summary, header)
    (out / "results.md").write_text(table)
    plot(summary, out / "loss_vs_cost.png", f"{name}: equal compute")
    plot(summary["equal_steps"], out / "loss_vs_cost_equal_steps.png", f"{name}: equal steps")
    print("\n" + table)
    print(f"written: {out}/results.json, results.md, loss_vs_cost.png, loss_vs_cost_equal_steps.png"
          + (", base/" if name == "cpt" and scenario.base_dir else ""))
    return summary


def cmd_bench(args) -> int:
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.seeds < 1:
        print("ds-accel: error: --seeds: must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.step_only:
        step_bench.step_only(out, args.quick)
        return 0
    if args.base_only:
        scenario = Scenario.build("cpt", args.quick, args.size, None)
        print(f"base model: {scenario.base_dir}")
        return 0
    scenario = args.scenario or ("cpt" if args.quick else "all")
    names = SCENARIOS if scenario == "all" else (scenario,)
    for name in names:
        run_scenario(name, args, out / name if len(names) > 1 else out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="dense vs V-cycle vs SAT (and SAT's variants) with seeds, continual "
                                     "pretraining and from scratch, at equal compute and equal steps")
    p.add_argument("--scenario", choices=SCENARIOS + ("all",), default=None,
                   help="cpt: continual pretraining of a KJV base on the Python stdlib; scratch: from a random "
                        "init on the KJV; all: both, into OUT/cpt and OUT/scratch (default; cpt with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; 2 with --quick)")
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument("--quick", action="store_true",
                   help="minutes: the tiny preset, 40-step runs on corpus slices, the cpt scenario unless --scenario")
    p.add_argument("--size", default=None, help="model preset instead of the scenario's (scratch: the model; cpt: "
                                                "the base, pretrained anew)")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="cpt: continue this HF Llama directory (with its tokenizer) instead of the bundled base")
    p.add_argument("--base-only", action="store_true", help="cpt: pretrain (or find) the base model and stop")
    p.add_argument("--methods", default=None,
                   help="comma list (dense always runs); cpt: " + ", ".join(SCENARIO_METHODS["cpt"])
                        + "; scratch: " + ", ".join(SCENARIO_METHODS["scratch"]))
    p.add_argument("--reuse", action="store_true", help="read runs already finished in OUT with the same config")
    p.add_argument("--step-only", action="store_true",
                   help="only the SAT step micro-benchmark on this machine's device (and, on CPU, the ZeRO-1 "
                        "bookkeeping share): OUT/sat_step.json and sat_step.md")
    p.set_defaults(func=cmd_bench)


__all__ = ["METHODS", "add_parser", "cmd_bench", "cost_to_reach", "run_method"]

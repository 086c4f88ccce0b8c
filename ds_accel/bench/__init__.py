"""``ds-accel bench``: dense vs V-cycle vs SAT vs both, same model, data order and machine, one run.

Every method trains from the same initial weights (seeded init) on the same batches (seeded
sampler) for the same number of steps, each in its own process so its peak memory is its own.
The cost to reach quality is read off the validation curve: the FLOPs and training wall-clock at
which a method's validation loss first reaches dense's final validation loss, linearly
interpolated between evaluations, as a ratio to dense's own cost of reaching it. Then the SAT
step micro-benchmark (``step_bench``) runs, and everything is written as Markdown, JSON and PNG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .. import step_bench

METHODS: dict[str, dict[str, Any]] = {
    "dense": {},
    "vcycle": {"multilevel": {"enabled": True}},
    "sat": {"sat": {"enabled": True}},
    "vcycle+sat": {"multilevel": {"enabled": True}, "sat": {"enabled": True}},
}
BASE = Path(__file__).parents[1] / "configs" / "bench.yaml"
QUICK = {"run": {"total_steps": 120, "eval_every": 10}, "data": {"max_chars": 1_500_000}}


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def run_method(name: str, cfg: dict, out: Path) -> dict[str, Any]:
    """Train one method in a child process; returns its result and evaluation curve."""
    run_dir = out / name.replace("+", "_")
    cfg = _merge(cfg, {"run": {"output_dir": str(run_dir), "export": False}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    print(f"\n== {name} ==", flush=True)
    subprocess.run([sys.executable, "-m", "ds_accel.cli", "train", "--config", str(run_dir / "config.yaml")],
                   check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run_dir / "result.json").read_text())
    curve = [(r["flops"], r["wall_s"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"result": result, "curve": curve}


def cost_to_reach(curve: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(FLOPs, wall-clock) where validation loss first reaches ``target``, linear between evaluations."""
    prev = (0.0, 0.0, float("inf"))
    for point in curve:
        if point[2] <= target:
            if prev[2] == float("inf"):
                return point[0], point[1]
            frac = (prev[2] - target) / (prev[2] - point[2])
            return (prev[0] + frac * (point[0] - prev[0]), prev[1] + frac * (point[1] - prev[1]))
        prev = point
    return None


def summarize(runs: dict[str, dict]) -> dict[str, Any]:
    """results.json's ``methods`` table: final loss, cost, and cost-to-dense-quality ratios."""
    target = runs["dense"]["result"]["val_loss"]
    dense_cost = cost_to_reach(runs["dense"]["curve"], target)
    methods = {}
    for name, run in runs.items():
        reach = cost_to_reach(run["curve"], target)
        r = run["result"]
        methods[name] = {
            "final_val_loss": r["val_loss"], "flops": r["flops"], "wall_s": r["wall_s"],
            "peak_mem_mb": r["peak_mem_mb"], "tokens": r["tokens"],
            "flops_ratio_to_target": None if reach is None else reach[0] / dense_cost[0],
            "time_ratio_to_target": None if reach is None else reach[1] / dense_cost[1],
        }
    return {"target_val_loss": target, "methods": methods}


def _ratio(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.2f}"


def markdown(summary: dict, step: dict | None, header: str) -> str:
    dense = summary["methods"]["dense"]
    lines = [header, "",
             f"Target: dense's final validation loss {summary['target_val_loss']:.4f}.", "",
             "| method | final val loss | vs dense | FLOPs (vs dense) | wall-clock s (vs dense) | FLOPs to target "
             "| time to target | peak memory MB |", "|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {m['final_val_loss']:.4f} | {m['final_val_loss'] / dense['final_val_loss'] - 1:+.2%} "
            f"| {m['flops']:.3e} ({m['flops'] / dense['flops']:.2f}) | {m['wall_s']:.0f} "
            f"({m['wall_s'] / dense['wall_s']:.2f}) | {_ratio(m['flops_ratio_to_target'])} "
            f"| {_ratio(m['time_ratio_to_target'])} | {m['peak_mem_mb']:.0f} |")
    if step is not None:
        lines += ["", "SAT training step (forward + backward + AdamW) against dense:", "", step_bench.table(step)]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        flops, wall, val = zip(*run["curve"])
        axes[0].plot(flops, val, "o-", ms=3, label=name)
        axes[1].plot(wall, val, "o-", ms=3, label=name)
    target = runs["dense"]["result"]["val_loss"]
    for ax, xlabel in zip(axes, ("training FLOPs", "training wall-clock (s)")):
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend()
    axes[0].set_title("loss vs compute")
    axes[1].set_title("loss vs time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_bench(args) -> int:
    import platform

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(BASE.read_text())
    if args.quick:
        base = _merge(base, QUICK)
    if args.size:
        base = _merge(base, {"model": {"preset": args.size}})
    methods = args.methods.split(",") if args.methods else list(METHODS)
    if "dense" not in methods:
        methods.insert(0, "dense")
    runs = {name: run_method(name, _merge(base, METHODS[name]), out) for name in methods}
    summary = summarize(runs)
    step = None if args.skip_step_bench else step_bench.run(quick=args.quick)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    header = (f"ds-accel bench{' --quick' if args.quick else ''}: preset {base['model']['preset']}, "
              f"{base['run']['total_steps']} steps, on {machine}")
    (out / "results.json").write_text(json.dumps({**summary, "machine": machine}, indent=1))
    if step is not None:
        (out / "sat_step.json").write_text(json.dumps(step, indent=1))
    table = markdown(summary, step, header)
    (out / "results.md").write_text(table)
    plot(runs, out / "loss_vs_cost.png")
    print("\n" + table)
    print(f"written: {out}/results.json, results.md, loss_vs_cost.png" + ("" if step is None else ", sat_step.json"))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="dense vs V-cycle vs SAT vs both at equal steps, plus the SAT step benchmark")
    p.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer steps, a smaller corpus slice")
    p.add_argument("--size", default=None, help="model preset instead of the bench config's (e.g. base on a GPU)")
    p.add_argument("--methods", default=None, help="comma list among " + ", ".join(METHODS) + " (default all)")
    p.add_argument("--skip-step-bench", action="store_true", help="skip the SAT step micro-benchmark")
    p.set_defaults(func=cmd_bench)

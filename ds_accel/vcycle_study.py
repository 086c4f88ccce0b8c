"""``ds-accel vcycle-study``: does the V-cycle pay off in compute, in the regime it is made for?

For a preset and a FLOPs budget, trains dense, the *control* (a dense model of the V-cycle's small
level's shape) and V-cycle variants (``VARIANTS``), each with N seeds, each run in its own process
(``bench.runs.run_method``). Every method gets the step count at which its own schedule spends the
budget (``budget.steps_for_budget``), so the comparison is at equal compute; V-cycle stages are laid
over that step count.

Budget rule: dense trains ``tokens_per_param`` tokens per parameter of the large model (about 20 is
compute-optimal, Hoffmann et al. 2022). Far below it every model is undertrained and the smaller one
wins per FLOP, which says nothing about a method meant for the regime where the large model is the
right one for the compute; the control shows which regime a budget is in. ``--budget-scales`` adds
smaller budgets (fractions of that one).

Seed s gives every method the same data order; dense and the V-cycle also start from the same
weights. Outputs per budget (``OUT/<budget>/``): ``results.json`` (every run's result, validation
curve and the aggregates; per-step rows stay in the runs' ``metrics.jsonl``), ``results.md`` (mean
and [min, max] over seeds: final validation loss at equal compute, FLOPs and wall-clock to dense's
final loss of the same seed), ``curves.png``
(validation loss against FLOPs and wall-clock, transitions marked) and ``transitions.png`` (training
loss around each transition minus dense's on the same batches: what coalescing and de-coalescing +
interpolation cost). A finished run of the same config is read back, not trained again, so an
interrupted study continues where it stopped. ``--jobs N`` trains N runs side by side (:func:`run_all`).
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean
from typing import Any

from .bench.report import stats
from .bench.runs import cost_to_reach, merge, run_method
from .budget import run_flops, steps_for_budget, tokens_per_step
from .config import ConfigError, from_dict
from .models import PRESETS, count_params, model_config
from .runtime import usable_core_ids, usable_cores

BASE: dict[str, dict[str, Any]] = {
    "run": {"eval_batches": 8, "log_every": 1, "progress": False, "save_every": 0},
    "data": {"seq_len": 128},
    "optim": {"lr": 2e-3, "micro_batch_size": 8, "min_lr_ratio": 0.0},  # every schedule decays to 0
}
WARMUP = 0.02  # of a run's steps: dense's and the control's warm-up, the variants' warm-up after transitions
VCYCLE = {"enabled": True, "lr_schedule": "authors", "step_fractions": [0.1, 0.45, 0.45], "lr_scale": [1.0, 2.0],
          "alpha": 0.5, "optimizer_policy": "fresh", "transition_warmup": 0}
VARIANTS: dict[str, dict[str, Any]] = {  # one change each from VCYCLE, the authors' recipe at a 45% small share
    "vcycle": {},
    "vcycle+transfer": {"optimizer_policy": "transfer"},
    "vcycle+warmup": {"transition_warmup": WARMUP},
    "vcycle-share25": {"step_fractions": [0.1, 0.25, 0.65]},
    "vcycle-alpha0.25": {"alpha": 0.25},
    "vcycle-width": {"depth_factor": 1},  # coalesce the width only: averaging layers costs the most (coalesce_probe)
}
DENSE, CONTROL = "dense", "dense-small"
METHODS = (DENSE, CONTROL, *VARIANTS)


def method_config(base: dict, method: str, small_init: Path | None = None) -> dict:
    """A method's run config without its step count: dense, the control (``small_init``: a checkpoint of
    the small level's shape; its LR is the V-cycle small level's peak) or a V-cycle variant."""
    if method == DENSE:
        return base
    if method == CONTROL:
        lr = base["optim"]["lr"] * VCYCLE["lr_scale"][1]
        return merge(base, {"model": {"pretrained": str(small_init)}, "optim": {"lr": lr}})
    return merge(base, {"multilevel": {**VCYCLE, **VARIANTS[method]}})


def with_steps(cfg: dict, steps: int) -> dict:
    """``cfg`` run for ``steps`` steps: warm-ups as fractions of them, about 40 validation points."""
    ml = cfg.get("multilevel", {})
    extra = {"run": {"total_steps": steps, "eval_every": max(1, steps // 40)},
             "optim": {"warmup_steps": max(1, round(WARMUP * steps)) if steps > 1 else 0}}
    if ml.get("transition_warmup"):
        extra["multilevel"] = {"transition_warmup": max(1, round(ml["transition_warmup"] * steps))}
    return merge(cfg, extra)


def small_level_checkpoint(base: dict, vocab_size: int, seed: int, path: Path) -> Path:
    """A HF checkpoint of the V-cycle's small level's shape, initialised as the trainer initialises a
    preset (``models.initial_value``, seeded): the control starts as any model of that shape would."""
    import torch
    from transformers import LlamaForCausalLM

    from .models import initial_value
    from .multilevel.vcycle import level_configs

    if (path / "config.json").is_file():
        return path
    cfg = from_dict(merge(base, {"multilevel": VCYCLE}))
    conf = level_configs(model_config(cfg.model, vocab_size), cfg.multilevel)[1]
    model = LlamaForCausalLM(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, p.shape, conf, seed))
    model.save_pretrained(path)
    return path


def transition_costs(rows: list[dict], dense_rows: list[dict], before: int = 5) -> list[dict]:
    """What happens at each transition.

    Training loss: the mean of the last ``before`` steps of the old level and the first step of the new
    one (its loss is taken before it updates: what the transition itself did), each minus dense's loss
    on the same steps, which train on the same batches; ``cost`` is how much that gap grew. Validation
    loss at the last evaluation before the transition (the end of a level's stage), and dense's at the
    same FLOPs: how far the level got per FLOP.
    """
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    dense = {r["step"]: r["loss"] for r in dense_rows if "loss" in r}
    dense_curve = [(r["flops"], r["val_loss"]) for r in dense_rows if "val_loss" in r]
    out = []
    for r in rows:
        if "transition" not in r:
            continue
        s = r["step"]
        window = [t for t in range(s - before + 1, s + 1) if t in loss and t in dense]
        gap_before = mean(loss[t] - dense[t] for t in window)
        gap_after = loss[s + 1] - dense[s + 1]
        last_eval = [v for v in rows if "val_loss" in v and v["step"] <= s][-1]
        out.append({"step": s, "transition": r["transition"], "level": r["level"],
                    "loss_before": mean(loss[t] for t in window), "loss_after": loss[s + 1],
                    "gap_before": gap_before, "gap_after": gap_after, "cost": gap_after - gap_before,
                    "val_before": last_eval["val_loss"],
                    "dense_val_same_flops": _interpolate(dense_curve, last_eval["flops"])})
    return out


def _interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve's value at ``x``, linear between points; None outside it."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return None


def _spread(values: list[float | None]) -> dict[str, Any]:
    """The bench's mean/min/max/n over the values that exist, and how many seeds there were."""
    return {**stats(values), "of": len(values)}


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Aggregates over seeds; ``runs[method][i]`` is seed i's run (result, curve, rows)."""
    dense = runs[DENSE]
    methods = {}
    for method, seeds in runs.items():
        final, vs_dense, flops_ratio, time_ratio = [], [], [], []
        for run, ref in zip(seeds, dense):
            target = ref["result"]["val_loss"]
            dense_cost = cost_to_reach(ref["curve"], target)
            reach = cost_to_reach(run["curve"], target)
            final.append(run["result"]["val_loss"])
            vs_dense.append(run["result"]["val_loss"] / target - 1)
            flops_ratio.append(None if reach is None else reach[0] / dense_cost[0])
            time_ratio.append(None if reach is None else reach[1] / dense_cost[1])
        costs = [transition_costs(run["rows"], ref["rows"]) for run, ref in zip(seeds, dense)]
        methods[method] = {
            "steps": seeds[0]["result"]["step"], "final_val_loss": _spread(final), "vs_dense": _spread(vs_dense),
            "flops": _spread([r["result"]["flops"] for r in seeds]),
            "wall_s": _spread([r["result"]["wall_s"] for r in seeds]),
            "flops_to_dense_final": _spread(flops_ratio), "time_to_dense_final": _spread(time_ratio),
            "transitions": [{"transition": per_seed[0]["transition"], "step": per_seed[0]["step"],
                             "cost": _spread([c["cost"] for c in per_seed]),
                             "gap_before": _spread([c["gap_before"] for c in per_seed]),
                             "val_before": _spread([c["val_before"] for c in per_seed]),
                             "dense_val_same_flops": _spread([c["dense_val_same_flops"] for c in per_seed])}
                            for per_seed in zip(*costs)],
        }
    return methods


def _fmt(s: dict, form: str = "{:.4f}") -> str:
    if s["mean"] is None:
        return "not reached"
    text = f"{form.format(s['mean'])} [{form.format(s['min'])}, {form.format(s['max'])}]"
    return text + (f" ({s['n']}/{s['of']} reached)" if s["n"] < s["of"] else "")


def markdown(summary: dict, header: str) -> str:
    dense = summary[DENSE]
    lines = [header, "", "Mean [min, max] over seeds. Ratios to dense are per seed (dense's final validation loss "
             "of the same seed is the target).", "",
             "| method | steps | final val loss | vs dense | FLOPs (vs dense) | wall-clock s (vs dense) "
             "| FLOPs to dense's final loss | time to dense's final loss |", "|---|---|---|---|---|---|---|---|"]
    for name, m in summary.items():
        lines.append(f"| {name} | {m['steps']} | {_fmt(m['final_val_loss'])} | {_fmt(m['vs_dense'], '{:+.2%}')} "
                     f"| {m['flops']['mean']:.3e} ({m['flops']['mean'] / dense['flops']['mean']:.2f}) "
                     f"| {m['wall_s']['mean']:.0f} ({m['wall_s']['mean'] / dense['wall_s']['mean']:.2f}) "
                     f"| {_fmt(m['flops_to_dense_final'], '{:.2f}')} | {_fmt(m['time_to_dense_final'], '{:.2f}')} |")
    lines += ["", "Each transition: validation loss at the last evaluation before it (the end of the level's stage) "
              "and dense's at the same FLOPs; training loss minus dense's on the same batches over the 5 steps "
              "before it, and how much that gap grew at the first step after it (measured before that step's "
              "update): what coalescing, or de-coalescing + interpolation, cost.", "",
              "| method | transition | at step | val loss before | dense at equal FLOPs | train gap to dense before "
              "| cost of the transition |", "|---|---|---|---|---|---|---|"]
    for name, m in summary.items():
        for t in m["transitions"]:
            lines.append(f"| {name} | {t['transition']} | {t['step']} | {_fmt(t['val_before'])} "
                         f"| {_fmt(t['dense_val_same_flops'])} | {_fmt(t['gap_before'], '{:+.3f}')} "
                         f"| {_fmt(t['cost'], '{:+.3f}')} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, list[dict]], path: Path) -> Path:
    """Validation loss (mean over seeds, band min..max) against FLOPs and wall-clock; dotted verticals at
    each V-cycle transition, in its method's colour; dense's final loss as a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, seeds in runs.items():
        points = list(zip(*[run["curve"] for run in seeds]))  # per evaluation, one (flops, wall, val) per seed
        flops = [mean(p[0] for p in point) for point in points]
        wall = [mean(p[1] for p in point) for point in points]
        vals = [[p[2] for p in point] for point in points]
        for ax, x in zip(axes, (flops, wall)):
            line, = ax.plot(x, [mean(v) for v in vals], "-", lw=1.5, label=name)
            ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
        for r in seeds[0]["rows"]:
            if "transition" in r:
                axes[0].axvline(_flops_at(seeds[0]["rows"], r["step"]), color=line.get_color(), ls=":", lw=1)
    target = mean(run["result"]["val_loss"] for run in runs[DENSE])
    for ax, xlabel in zip(axes, ("training FLOPs", "training wall-clock (s)")):
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.5))
    axes[0].legend(fontsize=8)
    axes[0].set_title("loss vs compute (dotted: transitions)")
    axes[1].set_title("loss vs time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _flops_at(rows: list[dict], step: int) -> float:
    """Cumulative FLOPs after ``step`` (the metrics row of that step; transitions are logged after it)."""
    return next(r["flops"] for r in rows if r.get("step") == step and "flops" in r)


def plot_transitions(runs: dict[str, list[dict]], path: Path, window: int) -> Path:
    """Per transition kind, V-cycle training loss minus dense's on the same steps (same batches), mean over
    seeds, from ``window`` steps before to ``window`` after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [{r["step"]: r["loss"] for r in run["rows"] if "loss" in r} for run in runs[DENSE]]
    kinds = ("coalesce", "decoalesce+interpolate")
    fig, axes = plt.subplots(1, len(kinds), figsize=(12, 4), sharey=True)
    for name, seeds in runs.items():
        if not name.startswith("vcycle"):
            continue
        for ax, kind in zip(axes, kinds):
            at = next(r["step"] for r in seeds[0]["rows"] if r.get("transition") == kind)
            offsets = range(-window, window + 1)
            gaps = []
            for run, ref in zip(seeds, dense):
                loss = {r["step"]: r["loss"] for r in run["rows"] if "loss" in r}
                gaps.append([loss[at + o] - ref[at + o] if at + o in loss and at + o in ref else float("nan")
                             for o in offsets])
            ax.plot(list(offsets), [mean(col) for col in zip(*gaps)], lw=1, label=name)
    for ax, kind in zip(axes, kinds):
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{kind}: training loss minus dense's")
        ax.set_xlabel("steps from the transition (first step at the new level: +1)")
    axes[0].set_ylabel("loss - dense loss (same batches)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_budget(base: dict, methods: list[str], seeds: int, scale: float, tokens_per_param: float,
               vocab_size: int, out: Path, jobs: int = 1) -> dict[str, Any]:
    """Every method and seed at one budget: dense's tokens = scale * tokens_per_param * parameters.
    Every run's config is built and checked before the first one starts."""
    dense_cfg = from_dict(with_steps(base, 1))
    params = count_params(model_config(dense_cfg.model, vocab_size))
    dense_steps = max(1, round(scale * tokens_per_param * params / tokens_per_step(dense_cfg)))
    budget = run_flops(dense_cfg, vocab_size, dense_steps)
    steps: dict[str, int] = {}
    plan = []
    for seed in range(seeds):
        for method in methods:
            small = small_level_checkpoint(base, vocab_size, seed, out / "small_init" / f"seed{seed}") \
                if method == CONTROL else None
            cfg = merge(method_config(base, method, small), {"run": {"seed": seed}})
            if method not in steps:  # FLOPs don't depend on the warm-ups: count with none, then set them
                probe = merge(cfg, {"multilevel": {"transition_warmup": 0}} if "multilevel" in cfg else {})
                steps[method] = dense_steps if method == DENSE else \
                    steps_for_budget(from_dict(with_steps(probe, dense_steps)), vocab_size, budget)
            cfg = with_steps(cfg, steps[method])
            from_dict(cfg)  # a config mistake stops the study before any run, naming the field
            plan.append((seed, method, cfg))
    done = run_all(plan, out, jobs)
    runs = {m: [done[(seed, m)] for seed in range(seeds)] for m in methods}
    return {"params": params, "dense_steps": dense_steps, "tokens": dense_steps * tokens_per_step(dense_cfg),
            "budget_flops": budget, "steps": steps, "runs": runs}


def run_all(plan: list[tuple[int, str, dict]], out: Path, jobs: int) -> dict[tuple[int, str], dict]:
    """Every planned (seed, method, config) run, read back with its metrics rows; ``jobs`` > 1 runs that
    many side by side, each pinned to its own share of this process's cores, longest first (by steps) so
    that the last to start are short ones. Runs side by side share memory bandwidth and caches: compare
    wall-clock only within one study."""
    def one(seed: int, method: str, cfg: dict, cpus: set[int] | None = None) -> dict:
        run = run_method(method, cfg, out / f"seed{seed}", reuse=True, cpus=cpus)
        run["rows"] = [json.loads(x) for x in (run.pop("run_dir") / "metrics.jsonl").read_text().splitlines()]
        return run

    if jobs == 1:
        return {(seed, method): one(seed, method, cfg) for seed, method, cfg in plan}
    cores = usable_core_ids()
    share = max(1, len(cores) // jobs)
    slots: queue.Queue[set[int]] = queue.Queue()
    for k in range(jobs):
        slots.put(set(cores[k * share:(k + 1) * share]) or {cores[k % len(cores)]})

    def pinned(seed: int, method: str, cfg: dict) -> dict:
        cpus = slots.get()
        try:
            return one(seed, method, cfg, cpus)
        finally:
            slots.put(cpus)

    with ThreadPoolExecutor(jobs) as pool:
        futures = {(seed, method): pool.submit(pinned, seed, method, cfg)
                   for seed, method, cfg in sorted(plan, key=lambda p: -p[2]["run"]["total_steps"])}
    return {key: future.result() for key, future in futures.items()}


def cmd_vcycle_study(args: argparse.Namespace) -> int:
    import torch

    from .data import prepare

    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    if DENSE not in methods:
        methods.insert(0, DENSE)
    if args.preset not in PRESETS:
        raise ConfigError(f"--preset: {args.preset!r} is not one of {', '.join(PRESETS)}")
    if args.seeds < 1 or args.tokens_per_param <= 0 or args.jobs < 1:
        raise ConfigError("--seeds / --tokens-per-param / --jobs: must be >= 1 / > 0 / >= 1")
    base = merge(BASE, {"model": {"preset": args.preset}, "data": {"corpus": args.corpus, "max_chars": args.max_chars},
                        "deepspeed": {"config": f"ds_configs/zero{args.zero}.json"}})
    if args.dtype != "auto":
        base = merge(base, {"model": {"dtype": args.dtype}})
    vocab_size = prepare(from_dict(base).data).vocab_size  # the tokenizer, once, into the shared cache
    machine = f"{platform.processor() or platform.machine()}, {usable_cores()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():  # the runs train there
        machine += f", {torch.cuda.get_device_name()}"
    out = Path(args.out)
    for scale in (float(s) for s in args.budget_scales.split(",")):
        where = out / f"budget{scale:g}"
        study = run_budget(base, methods, args.seeds, scale, args.tokens_per_param, vocab_size, where,
                           args.jobs)
        summary = summarize(study["runs"])
        header = (f"V-cycle study: preset {args.preset} ({study['params']:,} parameters), budget "
                  f"{scale * args.tokens_per_param:g} tokens/parameter for dense ({study['dense_steps']} steps, "
                  f"{study['tokens']:,} tokens, {study['budget_flops']:.3e} FLOPs), {args.seeds} seed(s), "
                  f"on {machine}" + (f", {args.jobs} runs side by side" if args.jobs > 1 else ""))
        runs = {m: [{k: v for k, v in run.items() if k != "rows"} for run in seeds]
                for m, seeds in study["runs"].items()}
        (where / "results.json").write_text(json.dumps(  # per-step rows stay in each run's metrics.jsonl
            {"header": header, "base": base, "vcycle": VCYCLE, "variants": VARIANTS, **study, "runs": runs,
             "summary": summary}, indent=1))
        table = markdown(summary, header)
        (where / "results.md").write_text(table)
        plot_curves(study["runs"], where / "curves.png")
        if any(m.startswith("vcycle") for m in methods):
            plot_transitions(study["runs"], where / "transitions.png", window=max(5, study["dense_steps"] // 50))
        print("\n" + table)
        print(f"written: {where}/results.json, results.md, curves.png, transitions.png")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("vcycle-study", help="dense vs a small-shape control vs V-cycle variants at equal compute, "
                                            "several seeds", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vcycle_study", help="output directory (default runs/vcycle_study)")
    p.add_argument("--preset", default="tiny", help="model preset of the large level (default tiny)")
    p.add_argument("--tokens-per-param", type=float, default=20.0,
                   help="dense's tokens per parameter of the large model (default 20, compute-optimal)")
    p.add_argument("--budget-scales", default="1,0.25", help="budgets as fractions of that one (default 1,0.25)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--methods", default=None, help="comma list among " + ", ".join(METHODS) + " (default all)")
    p.add_argument("--corpus", default="kjv", choices=("kjv", "stdlib"), help="bundled corpus (default kjv)")
    p.add_argument("--max-chars", type=int, default=0, help="use only the first N characters of the corpus (checks)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO stage, one process (default 0; on a GPU, in bf16, use 1: under ZeRO-0 DeepSpeed keeps "
                        "bf16 training's fp32 weights where a V-cycle transition's writes don't reach)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="model.dtype of every run (default auto: bf16 on GPUs that have it, else fp32)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs side by side, each pinned to its share of the cores (default 1; a tiny preset "
                        "gains little from a second thread, so on a CPU one job per core finishes a study sooner)")
    p.set_defaults(func=cmd_vcycle_study)

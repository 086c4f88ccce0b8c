"""Seeds to figures: per-method mean and range, cost to reach dense's quality, results.json/.md and plots.

Each seed of a method is paired with dense's run of the same seed (the same data order, and in CPT the
same base): its target is that dense run's final validation loss, and its cost ratios are the FLOPs
and wall-clock at which it first reaches that loss over dense's own (:func:`.runs.cost_to_reach`), None
when it never does. Over the seeds a figure is reported as mean, min and max. A difference is called a
gain only when the seeds' ranges do not overlap: a method's final loss is "lower" than dense's when its
highest seed is below dense's lowest, and a cost ratio is a gain when every seed reached the target at
a ratio below 1. One seed has no range: nothing is called a gain then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runs import cost_to_reach

Stats = dict[str, Any]


def stats(values: list[float | None]) -> Stats:
    """{"mean", "min", "max"} over the values that exist, and how many did ("n"); None figures if none."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(present) / len(present), "min": min(present), "max": max(present), "n": len(present)}


def compare(method: Stats, dense: Stats) -> str:
    """"lower" / "higher" when the seeds' ranges separate from dense's, else "overlap" ("one seed": no range)."""
    if min(method["n"], dense["n"]) < 2:
        return "one seed"
    if method["max"] < dense["min"]:
        return "lower"
    if method["min"] > dense["max"]:
        return "higher"
    return "overlap"


def with_ratios(runs: list[dict], dense_runs: list[dict]) -> list[dict]:
    """Each run (a seed) with its target (dense's final loss, same seed) and cost ratios to reach it."""
    dense_by_seed = {d["seed"]: d for d in dense_runs}
    out = []
    for run in runs:
        dense = dense_by_seed[run["seed"]]
        target = dense["final_val_loss"]
        own, reference = cost_to_reach(run["curve"], target), cost_to_reach(dense["curve"], target)
        out.append({**run, "target_val_loss": target,
                    "vs_dense": run["final_val_loss"] / target - 1,
                    "flops_ratio_to_target": None if own is None else own[0] / reference[0],
                    "time_ratio_to_target": None if own is None else own[1] / reference[1]})
    return out


def summarize_view(runs: dict[str, list[dict]], source: bool) -> dict[str, Any]:
    """One view's ``target_val_loss`` (mean of dense's seeds) and ``methods`` table."""
    dense_runs = runs["dense"]
    methods = {}
    for name, method_runs in runs.items():
        paired = with_ratios(method_runs, dense_runs)
        entry: dict[str, Any] = {"steps": paired[0]["steps"]}
        for key in ("final_val_loss", "vs_dense", "flops_ratio_to_target", "time_ratio_to_target",
                    "flops", "wall_s", "peak_mem_mb"):
            entry[key] = stats([r[key] for r in paired])
        if source:
            entry["source_val_loss"] = stats([r["source_val_loss"] for r in paired])
        entry["runs"] = paired
        methods[name] = entry
    dense_final = methods["dense"]["final_val_loss"]
    for entry in methods.values():
        entry["final_val_loss_vs_dense"] = compare(entry["final_val_loss"], dense_final)
        ratio = entry["flops_ratio_to_target"]
        entry["flops_gain"] = ratio["n"] == len(entry["runs"]) > 1 and ratio["max"] < 1
    return {"target_val_loss": dense_final["mean"], "methods": methods}


def summarize(scenario: str, seeds: list[int], executed: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """results.json: the equal-compute view at the top level (the issue's schema), equal steps beside it."""
    source = scenario == "cpt"
    compute = summarize_view(executed["runs"]["equal_compute"], source)
    steps = summarize_view(executed["runs"]["equal_steps"], source)
    return {"scenario": scenario, "seeds": list(seeds), "view": "equal_compute", **compute,
            "equal_steps": steps, "steps": executed["plan"], **extra}


def _fmt(s: Stats, digits: int = 3, percent: bool = False) -> str:
    if s["mean"] is None:
        return "not reached"
    f = (lambda v: f"{v:+.{digits}%}") if percent else (lambda v: f"{v:.{digits}f}")
    return f"{f(s['mean'])} [{f(s['min'])}, {f(s['max'])}]"


def _ratio(s: Stats, runs: int) -> str:
    text = _fmt(s, 2)
    return text if s["n"] in (0, runs) else f"{text} ({s['n']}/{runs} reached)"


def view_table(view: dict[str, Any], source: bool) -> str:
    head = ["method", "steps", "target val loss", "vs dense (paired)", "ranges"]
    head += ["base-corpus val loss (forgetting)"] if source else []
    head += ["FLOPs to target", "time to target", "FLOPs", "wall-clock s", "peak memory MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in view["methods"].items():
        n = len(m["runs"])
        ranges = "-" if name == "dense" else m["final_val_loss_vs_dense"]
        row = [name, str(m["steps"]), _fmt(m["final_val_loss"]), _fmt(m["vs_dense"], 1, percent=True), ranges]
        row += [_fmt(m["source_val_loss"])] if source else []
        row += [_ratio(m["flops_ratio_to_target"], n) + (" gain" if m["flops_gain"] and name != "dense" else ""),
                _ratio(m["time_ratio_to_target"], n), f"{m['flops']['mean']:.3e}", _fmt(m["wall_s"], 0),
                _fmt(m["peak_mem_mb"], 0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(summary: dict[str, Any], header: str) -> str:
    source = summary["scenario"] == "cpt"
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [header, "",
             f"Seeds {seeds}; each figure is the mean [min, max] over the seeds. Target: dense's final validation "
             f"loss of the same seed (mean {summary['target_val_loss']:.4f}); \"ranges\": lower / higher when the "
             "method's seeds all lie below / above dense's, else overlap; \"gain\": every seed reached the target "
             "with fewer FLOPs than dense.", ""]
    if "base" in summary:
        b = summary["base"]
        lines += [f"Base model before continual pretraining: target-domain val loss {b['target_val_loss']:.4f}, "
                  f"base-corpus val loss {b['source_val_loss']:.4f}.", ""]
    lines += ["Equal compute (every method spends dense's FLOPs):", "", view_table(summary, source), "",
              "Equal steps:", "", view_table(summary["equal_steps"], source)]
    return "\n".join(lines) + "\n"


def plot(view: dict[str, Any], path: Path, title: str) -> Path:
    """Validation loss against FLOPs and against wall-clock: per method the mean over seeds (at each
    evaluation) and a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in view["methods"].items():
        curves = [run["curve"] for run in m["runs"]]
        points = min(len(c) for c in curves)
        x_flops = [sum(c[i][0] for c in curves) / len(curves) for i in range(points)]
        x_wall = [sum(c[i][1] for c in curves) / len(curves) for i in range(points)]
        losses = [[c[i][2] for c in curves] for i in range(points)]
        mean = [sum(v) / len(v) for v in losses]
        for ax, x in zip(axes, (x_flops, x_wall)):
            (line,) = ax.plot(x, mean, "-", lw=1.3, label=name)
            ax.fill_between(x, [min(v) for v in losses], [max(v) for v in losses], color=line.get_color(), alpha=0.2)
    for ax, xlabel in zip(axes, ("training FLOPs", "training wall-clock (s)")):
        ax.axhline(view["target_val_loss"], color="grey", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (target domain)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

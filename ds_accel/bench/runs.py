"""One benchmark run: a training config trained in its own process, and what its curve says.

Each run is a child ``ds-accel train`` process, so its peak memory and wall-clock are its own and a
crash names the run. :func:`cost_to_reach` reads the cost of reaching a loss off a run's validation
curve; the V-cycle study runner reuses both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

Curve = list[tuple[float, float, float]]  # (cumulative FLOPs, training wall-clock s, validation loss)


def merge(base: dict, extra: dict) -> dict:
    """``base`` with the sections of ``extra`` laid over it, field by field (neither is modified)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def train_child(cfg: dict, run_dir: Path, resume: bool = False, cpus: set[int] | None = None) -> None:
    """``ds-accel train`` on ``cfg`` (written to ``run_dir/config.yaml``) in a child process.

    ``cpus``: pin the child to these cores (runs side by side then neither share nor oversubscribe
    cores; the child sizes its thread pool from its affinity) and send its output to ``run_dir/train.log``
    instead of interleaving it with its siblings'.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "ds_accel.cli", "train", "--config", str(run_dir / "config.yaml")]
    command += ["--resume"] if resume else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpus is None:
        subprocess.run(command, check=True, env=env)
        return
    log = run_dir / "train.log"
    with log.open("w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        os.sched_setaffinity(child.pid, cpus)  # before the interpreter has imported torch or started a thread
        if child.wait():
            raise subprocess.CalledProcessError(child.returncode, command, output=f"see {log}")


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``result.json`` and its validation curve from ``metrics.jsonl``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["flops"], r["wall_s"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"result": json.loads((run_dir / "result.json").read_text()), "curve": curve}


def run_method(name: str, cfg: dict, out: Path, reuse: bool = False,
               cpus: set[int] | None = None) -> dict[str, Any]:
    """Train one method in a child process under ``out/<name>``; returns its result and evaluation curve.

    The HF export is skipped unless ``cfg`` asks for it (``run.export``). ``reuse``: a finished run of
    the very same config already in that directory is read instead of trained again. ``cpus``: see
    :func:`train_child`.
    """
    run_dir = out / name.replace("+", "_")
    cfg = merge(merge({"run": {"export": False}}, cfg), {"run": {"output_dir": str(run_dir)}})
    finished = (run_dir / "result.json").is_file() and (run_dir / "config.yaml").is_file()
    if reuse and finished and yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg:
        print(f"\n== {name}: reusing the finished run ==", flush=True)
    else:
        print(f"\n== {name} ==" + (f" (cores {sorted(cpus)}, log {run_dir / 'train.log'})" if cpus else ""),
              flush=True)
        train_child(cfg, run_dir, cpus=cpus)
    return {**read_run(run_dir), "run_dir": run_dir}


def cost_to_reach(curve: Curve, target: float) -> tuple[float, float] | None:
    """(FLOPs, wall-clock) where validation loss first reaches ``target``, linear between evaluations.

    Before the first evaluation nothing is known, so a first evaluation already at or below the
    target counts as reached there. None: the curve never reaches it.
    """
    prev = (0.0, 0.0, float("inf"))
    for point in curve:
        if point[2] <= target:
            if prev[2] == float("inf"):
                return point[0], point[1]
            frac = (prev[2] - target) / (prev[2] - point[2])
            return prev[0] + frac * (point[0] - prev[0]), prev[1] + frac * (point[1] - prev[1])
        prev = point
    return None

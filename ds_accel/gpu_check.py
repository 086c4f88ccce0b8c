"""``ds-accel gpu-check`` (``make gpu-check``): what a person runs once on a CUDA machine.

(a) trains the ``small`` preset dense / V-cycle / SAT / both for ``--steps`` steps in bf16 under ZeRO-1
and ZeRO-3 on every GPU present, each run its own ``deepspeed`` launch of ``launch/train.py`` (the path
users take: NCCL, the launcher's environment, one process per GPU); (b) runs the SAT step benchmark on
the GPU in bf16 (``ds_accel.step_bench``, whose shapes include one Llama-2-7B decoder layer at 4,096
tokens); (c) writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``: the device, the torch / CUDA /
NCCL / DeepSpeed versions, every run's figures and their ratios to dense under the same ZeRO stage,
all measured in this one invocation. First of all, in a second, it checks SAT's sliced step against a
masked dense model on the GPU in float32 and bf16 (``ds_accel.sliced_check``: the loss and every gradient,
both attention paths).

Budget: about 10 minutes on one GPU, measured on one H200 (docs/benchmark/gpu/): a launch of 200 steps
takes 53-68 s, of which the training steps 13-29 s and the rest start-up (imports, NCCL, engine,
evaluation, checkpoint), so the eight runs take about 8 minutes; the step benchmark runs first, in
about a minute (the two calls there took 8 minutes, 7 launches included). A run that fails is recorded
(return code and the end of its log) and the others still run; the command exits non-zero when the
machine has no CUDA, a run failed, the sliced step disagreed with the masked model, or a run's
validation loss did not fall below its first logged loss.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .config import REPO_ROOT

METHODS: dict[str, dict[str, Any]] = {
    "dense": {},
    "vcycle": {"multilevel": {"enabled": True}},
    "sat": {"sat": {"enabled": True}},
    "vcycle+sat": {"multilevel": {"enabled": True}, "sat": {"enabled": True}},
    # the path that touches the optimizer state most (level transitions map the Adam moments, SAT's guard
    # keeps the omitted state): under ZeRO-Offload that state lives in host memory, the gradients on the GPU
    "vcycle+sat-freeze-transfer": {"multilevel": {"enabled": True, "optimizer_policy": "transfer"},
                                   "sat": {"enabled": True, "optimizer_policy": "freeze"}},
}
DEFAULT_METHODS = ("dense", "vcycle", "sat", "vcycle+sat")
STAGES = ("1", "3")  # ZeRO stages, named as in ds_configs/zero<stage>.json ("2_offload" too)
SEVEN_B = "llama2-7b-layer-4096"  # the step benchmark's Llama-2-7B layer at 4,096 tokens
RUN_TIMEOUT_S = int(os.environ.get("DS_ACCEL_GPU_CHECK_TIMEOUT", 300))  # one launch: a hung collective must not eat the GPU time


class NeedsCuda(RuntimeError):
    """gpu-check on a machine without a usable CUDA device."""


def require_cuda() -> int:
    """The number of GPUs, or :class:`NeedsCuda` with what is missing."""
    import torch

    from . import runtime

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
        raise NeedsCuda(f"gpu-check needs a CUDA GPU; this machine has none (torch {torch.__version__}, {build}). "
                        "Run `make gpu-check` on a machine with NVIDIA GPUs and a CUDA build of torch in .venv")
    if runtime.on_cpu():
        raise NeedsCuda("gpu-check needs the CUDA accelerator; DS_ACCELERATOR=cpu is set: unset it")
    return torch.cuda.device_count()


def environment() -> dict[str, Any]:
    """Device and software versions (called on the CUDA machine)."""
    import deepspeed
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M")}


def run_config(method: str, stage: str, steps: int, out: Path) -> dict[str, Any]:
    """The bench config (small preset, seq 128, micro-batch 8) in bf16 under ``ds_configs/zero<stage>.json``."""
    cfg = yaml.safe_load((REPO_ROOT / "ds_accel" / "configs" / "bench.yaml").read_text())
    overrides = {"run": {"output_dir": str(out), "total_steps": steps, "eval_every": max(1, steps // 3),
                         "log_every": max(1, steps // 12), "export": False, "progress": False},
                 "model": {"preset": "small", "dtype": "bf16"},
                 "deepspeed": {"config": str(REPO_ROOT / "ds_configs" / f"zero{stage}.json")}}
    for section, values in (*overrides.items(), *METHODS[method].items()):
        cfg.setdefault(section, {}).update(values)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(cfg: dict[str, Any], gpus: int) -> dict[str, Any]:
    """One ``deepspeed --num_gpus`` launch of launch/train.py; its figures, or why it failed."""
    out = Path(cfg["run"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus),
               "--master_port", str(_free_port()), str(REPO_ROOT / "launch" / "train.py"),
               "--config", str(out / "config.yaml")]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, log = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        log = log.decode(errors="replace") if isinstance(log, bytes) else log
    (out / "launch.log").write_text(log)
    entry: dict[str, Any] = {"launch_s": time.perf_counter() - start, "return_code": code}
    if code != 0 or not (out / "result.json").is_file():
        return {**entry, "status": "failed", "log_tail": log[-2000:]}
    result = json.loads((out / "result.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    entry.update(first_loss=losses[0], final_val_loss=result["val_loss"], wall_s=result["wall_s"],
                 tokens_per_s=result["tokens"] / result["wall_s"], flops=result["flops"],
                 peak_mem_mb=result["peak_mem_mb"])
    entry["status"] = "ok" if result["val_loss"] < losses[0] else "loss did not fall"
    return entry


def add_ratios(training: dict[str, dict[str, dict]]) -> None:
    """Each run's val loss, FLOPs and wall-clock relative to dense under the same ZeRO stage (in place)."""
    for runs in training.values():
        dense = runs.get("dense", {})
        for run in runs.values():
            if run.get("status") == "ok" and dense.get("status") == "ok":
                run["val_loss_vs_dense"] = run["final_val_loss"] / dense["final_val_loss"] - 1
                run["flops_vs_dense"] = run["flops"] / dense["flops"]
                run["wall_vs_dense"] = run["wall_s"] / dense["wall_s"]


def failures(report: dict[str, Any]) -> list[str]:
    bad = [f"{_title(stage)} {method}: {run['status']}" for stage, runs in report["training"].items()
           for method, run in runs.items() if run["status"] != "ok"]
    if report["step_bench"] and "error" in report["step_bench"]:
        bad.append(f"step benchmark: {report['step_bench']['error']}")
    for check in report.get("sliced_check") or []:
        if not check.get("passed"):
            bad.append(f"sliced == masked ({check.get('dtype', '?')}): " + check.get("error", "outside tolerance"))
    return bad


def _title(key: str) -> str:
    """"zero2_offload" -> "ZeRO-2 offload": a report heading for a training-table key."""
    return "ZeRO-" + key.removeprefix("zero").replace("_", " ")


def _ratio(run: dict, key: str, fmt: str) -> str:
    return f" ({run[key]:{fmt}})" if key in run else ""


def markdown(report: dict[str, Any]) -> str:
    """gpu_check.md: environment, one training table per ZeRO stage, the step benchmark."""
    env, s = report["environment"], report["settings"]
    lines = ["# ds-accel gpu-check", "",
             f"{env['gpus']} x {env['device']} ({env['memory_gib']} GiB), torch {env['torch']}, CUDA {env['cuda']}, "
             f"NCCL {env['nccl']}, DeepSpeed {env['deepspeed']}, transformers {env['transformers']}, "
             f"Python {env['python']}; {env['date']}.", "",
             f"Training: preset {s['preset']}, {s['steps']} steps of {s['tokens_per_step']:,} tokens, bf16, "
             "one `deepspeed` launch of launch/train.py per run; ratios are to dense under the same ZeRO stage.", ""]
    for stage, runs in report["training"].items():
        lines += [f"## {_title(stage)}", "",
                  "| method | status | first loss | final val loss (vs dense) | FLOPs (vs dense) "
                  "| training s (vs dense) | tokens/s | peak memory MB | launch s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, run in runs.items():
            if run["status"] == "failed":
                lines.append(f"| {method} | failed (exit {run['return_code']}) | | | | | | | {run['launch_s']:.0f} |")
                continue
            lines.append(f"| {method} | {run['status']} | {run['first_loss']:.3f} "
                         f"| {run['final_val_loss']:.4f}{_ratio(run, 'val_loss_vs_dense', '+.2%')} "
                         f"| {run['flops']:.3e}{_ratio(run, 'flops_vs_dense', '.2f')} "
                         f"| {run['wall_s']:.1f}{_ratio(run, 'wall_vs_dense', '.2f')} | {run['tokens_per_s']:,.0f} "
                         f"| {run['peak_mem_mb']:.0f} | {run['launch_s']:.0f} |")
        lines.append("")
    lines += _sliced_check_lines(report.get("sliced_check"))
    lines += _step_bench_lines(report["step_bench"])
    bad = failures(report)
    lines += ["", "Problems: " + "; ".join(bad) if bad else "All runs trained (validation loss below the first loss)."]
    return "\n".join(lines) + "\n"


def _sliced_check_lines(checks: list[dict[str, Any]] | None) -> list[str]:
    """gpu_check.md's section for ``ds_accel.sliced_check`` (largest relative errors against the masked model)."""
    if not checks:
        return []
    lines = ["## SAT's sliced step against the masked dense model", "",
             "| dtype | loss | largest gradient error (weight) | omitted gradients zero | attention paths "
             "| host syncs, dense / sliced | passed |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        if "error" in c:
            lines.append(f"| {c.get('dtype', '?')} | failed: {c['error']} | | | | | no |")
            continue
        lines.append(f"| {c['dtype']} | {c['loss']:.1e} | {c['gradient']:.1e} ({c['worst']}) | {c['omitted_zero']} "
                     f"| {'SDPA GQA and KV copies' if c['paths'] else 'not both taken'} "
                     f"| {_syncs(c.get('syncs'))} "
                     f"| {'yes' if c['passed'] else 'no'} (tolerance {c['tolerance']:g}) |")
    return lines + [""]


def _syncs(syncs: dict[str, int | None] | None) -> str:
    """'dense / sliced' host synchronisations, or 'n/a' where none were counted (off CUDA)."""
    if not syncs or syncs.get("sliced") is None:
        return "n/a"
    return f"{syncs['dense']} / {syncs['sliced']}"


def _sliced_check(device: str = "cuda") -> list[dict[str, Any]]:
    from . import sliced_check

    try:
        return sliced_check.run(device)
    except Exception as err:  # the report still carries the rest
        return [{"error": f"{type(err).__name__}: {err}", "passed": False}]


def _step_bench_lines(bench: dict[str, Any] | None) -> list[str]:
    """The step benchmark's section of gpu_check.md (none when it was not run: ``--no-step-bench``)."""
    from . import step_bench

    if not bench:
        return []
    lines = ["## SAT training step (forward + backward + AdamW, bf16) against dense", ""]
    if "error" in bench:
        return lines + [f"failed: {bench['error']}"]
    lines.append(step_bench.table(bench))
    for name, entry in bench["shapes"].items():  # keyed "<shape> <policy>"
        if name.split(" ")[0] == SEVEN_B and "0.5" in entry["rates"]:
            r = entry["rates"]["0.5"]
            lines += ["", f"Llama-2-7B layer at {entry['seq_len']:,} tokens, omission rate 0.5, "
                      f"{entry['policy']} policy: SAT step {r['measured_speedup']:.2f}x dense "
                      f"({r['flops_limit_speedup']:.2f}x is the FLOPs limit)."]
    return lines


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(markdown(report))
    return json_path, md_path


def _step_bench(quick: bool) -> dict[str, Any]:
    import torch

    from . import step_bench

    try:
        return step_bench.run(device="cuda", dtype=torch.bfloat16, quick=quick)
    except Exception as err:  # the report still carries the training runs
        return {"error": f"{type(err).__name__}: {err}"}


def cmd_gpu_check(args) -> int:
    from .config import from_dict
    from .data import prepare

    try:
        gpus = require_cuda()
    except NeedsCuda as err:
        print(f"ds-accel: error: {err}", file=sys.stderr)
        return 1
    print("== SAT's sliced step against the masked dense model (float32, bf16)", flush=True)
    sliced = _sliced_check()
    step = None
    if args.step_bench:
        print("== SAT step benchmark (bf16)", flush=True)  # first: it needs no launcher, and is the headline figure
        step = _step_bench(args.quick)
    runs_dir = Path(args.runs)
    first = run_config("dense", STAGES[0], args.steps, runs_dir / "prepare")
    prepare(from_dict(first).data)  # tokenizer and packed blocks once, outside every run's timing
    training: dict[str, dict[str, dict]] = {}
    for stage in args.stages:
        for method in args.methods:
            print(f"== {_title('zero' + stage)} {method}: {args.steps} steps on {gpus} GPU(s)", flush=True)
            cfg = run_config(method, stage, args.steps, runs_dir / f"zero{stage}" / method.replace("+", "_"))
            training.setdefault(f"zero{stage}", {})[method] = run = train_run(cfg, gpus)
            print(f"   {run['status']}, launch {run['launch_s']:.0f} s", flush=True)
    add_ratios(training)
    o = first["optim"]
    report = {"environment": environment(),
              "settings": {"preset": first["model"]["preset"], "steps": args.steps, "gpus": gpus,
                           "tokens_per_step": o["micro_batch_size"] * gpus * first["data"]["seq_len"]},
              "training": training, "step_bench": step, "sliced_check": sliced}
    json_path, md_path = write_report(report, Path(args.out))
    print("\n" + md_path.read_text())
    print(f"written: {json_path}, {md_path}")
    return 1 if failures(report) else 0


def _methods(text: str) -> list[str]:
    unknown = [m for m in text.split(",") if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}; choose among {', '.join(METHODS)}")
    return text.split(",")


def _stages(text: str) -> list[str]:
    known = sorted(p.stem.removeprefix("zero") for p in (REPO_ROOT / "ds_configs").glob("zero*.json"))
    unknown = [s for s in text.split(",") if s not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"no ds_configs/zero{unknown[0]}.json; choose among {', '.join(known)}")
    return text.split(",")


def add_parser(sub) -> None:
    p = sub.add_parser("gpu-check", help="on a CUDA machine: bf16 ZeRO-1/3 training runs of every method and the "
                                         "SAT step benchmark, written to docs/benchmark/gpu/")
    p.add_argument("--out", default="docs/benchmark/gpu", help="report directory (default docs/benchmark/gpu)")
    p.add_argument("--runs", default="runs/gpu-check", help="the training runs' output directories")
    p.add_argument("--steps", type=int, default=200, help="steps per training run (default 200)")
    p.add_argument("--step-bench", action=argparse.BooleanOptionalAction, default=True,
                   help="run the SAT step benchmark (default yes; --no-step-bench for training runs only)")
    p.add_argument("--quick", action="store_true", help="the step benchmark's quick mode (fewer repetitions)")
    p.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS),
                   help="comma list among " + ", ".join(METHODS) + " (default " + ",".join(DEFAULT_METHODS) + ")")
    p.add_argument("--stages", type=_stages, default=list(STAGES),
                   help="ZeRO stages, comma list of ds_configs/zero<stage>.json names (default 1,3; "
                        "2_offload and 3_offload offload the optimizer to host memory)")
    p.set_defaults(func=cmd_gpu_check)

"""``ds-accel gpu-check``: refuses a machine without CUDA before any work, and writes a report whose
ratios are the ones computed from the runs it is given (a result dict shaped like the real one)."""

import json

import pytest
import torch

from ds_accel import gpu_check, sliced_check
from ds_accel.cli import main

ENV = {"device": "NVIDIA H100 80GB HBM3", "gpus": 1, "memory_gib": 79.1, "torch": "2.13.0+cu128", "cuda": "12.8",
       "nccl": "2.27.3", "deepspeed": "0.19.8", "transformers": "5.24.0", "python": "3.11.2",
       "date": "2026-11-27 10:00"}


def _run(val: float, wall: float, flops: float, first: float = 7.6) -> dict:
    return {"status": "ok" if val < first else "loss did not fall", "return_code": 0, "launch_s": 41.0,
            "first_loss": first, "final_val_loss": val, "wall_s": wall, "tokens_per_s": 1024 * 300 / wall,
            "flops": flops, "peak_mem_mb": 900.0}


def _step_bench() -> dict:
    """Shaped like ``step_bench.run``'s result: entries keyed "<shape> <policy>"."""
    def entry(seq_len, policy, dense_ms):
        rates = {r: {"measured_speedup": dense_ms / sat, "flops_limit_speedup": limit, "dense_ms": dense_ms,
                     "sat_ms": sat, "speedup_range": [dense_ms / sat - 0.1, dense_ms / sat + 0.1]}
                 for r, sat, limit in (("0.25", dense_ms / 1.2, 1.33), ("0.5", dense_ms / 1.6, 2.0))}
        return {"seq_len": seq_len, "tokens": seq_len, "policy": policy, "rates": rates}

    shapes = {"small freeze": entry(128, "freeze", 20.0), f"{gpu_check.SEVEN_B} freeze": entry(4096, "freeze", 80.0),
              f"{gpu_check.SEVEN_B} adam": entry(4096, "adam", 64.0)}
    return {"rates": {r: {k: v[k] for k in ("measured_speedup", "flops_limit_speedup")}
                      for r, v in shapes["small freeze"]["rates"].items()},
            "shapes": shapes, "device": "cuda", "dtype": "bfloat16", "threads": 16}


def _report() -> dict:
    training = {"zero1": {"dense": _run(4.0, 10.0, 1e13), "vcycle": _run(4.2, 8.0, 8e12),
                          "sat": _run(3.8, 7.5, 6e12), "vcycle+sat": _run(3.9, 6.0, 5e12)},
                "zero3": {"dense": _run(4.0, 20.0, 1e13), "vcycle": _run(4.1, 15.0, 8e12),
                          "sat": {"status": "failed", "return_code": 1, "launch_s": 12.0, "log_tail": "NCCL error"},
                          "vcycle+sat": _run(7.7, 12.0, 5e12)},
                "zero2_offload": {"dense": _run(4.0, 30.0, 1e13), "sat": _run(3.9, 24.0, 6e12)}}
    gpu_check.add_ratios(training)
    return {"environment": ENV, "settings": {"preset": "small", "steps": 300, "gpus": 1, "tokens_per_step": 1024},
            "training": training, "step_bench": _step_bench(), "sliced_check": sliced_check.run("cpu")}


def test_refuses_a_machine_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["gpu-check", "--out", str(tmp_path / "report"), "--runs", str(tmp_path / "runs")])
    assert code != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "runs").exists(), "work started before the refusal"


def test_report_writer_ratios_failures_and_step_bench(tmp_path):
    report = _report()
    json_path, md_path = gpu_check.write_report(report, tmp_path)
    assert json.loads(json_path.read_text()) == report
    zero1 = report["training"]["zero1"]
    assert zero1["sat"]["val_loss_vs_dense"] == pytest.approx(3.8 / 4.0 - 1)
    assert zero1["sat"]["wall_vs_dense"] == pytest.approx(0.75) and zero1["vcycle"]["flops_vs_dense"] == 0.8
    md = md_path.read_text()
    assert "1 x NVIDIA H100 80GB HBM3" in md and "CUDA 12.8" in md and "DeepSpeed 0.19.8" in md
    assert "| sat | ok | 7.600 | 3.8000 (-5.00%) | 6.000e+12 (0.60) | 7.5 (0.75) |" in md
    assert "| sat | failed (exit 1) |" in md
    assert "4,096 tokens, omission rate 0.5, freeze policy: SAT step 1.60x dense (2.00x is the FLOPs limit)" in md
    assert "| llama2-7b-layer-4096 | 4096 | adam | 0.5 | 64.0 | 40.0 | 1.60x | 1.50-1.70x | 2.00x | 80% |" in md
    assert gpu_check.failures(report) == ["ZeRO-3 sat: failed", "ZeRO-3 vcycle+sat: loss did not fall"]
    assert "## ZeRO-2 offload" in md and "| sat | ok | 7.600 | 3.9000 (-2.50%) | 6.000e+12 (0.60) | 24.0 (0.80) |" in md
    assert "Problems: ZeRO-3 sat: failed; ZeRO-3 vcycle+sat: loss did not fall" in md
    assert "| float32 | 0.0e+00 |" in md and "| SDPA GQA and KV copies | n/a | yes (tolerance 0.0001) |" in md
    assert "| bfloat16 |" in md and "yes (tolerance 0.05) |" in md


@pytest.mark.parametrize("stage,offload", [("3", False), ("2_offload", True)])
def test_run_configs_are_bf16_on_the_zero_stage(stage, offload):
    cfg = gpu_check.run_config("vcycle+sat", stage, 300, tmp := gpu_check.REPO_ROOT / "runs" / "x")
    assert cfg["model"] == {"preset": "small", "dtype": "bf16"} and cfg["run"]["total_steps"] == 300
    assert cfg["deepspeed"]["config"].endswith(f"ds_configs/zero{stage}.json") and cfg["run"]["output_dir"] == str(tmp)
    assert cfg["multilevel"]["enabled"] and cfg["sat"]["enabled"]
    from ds_accel.config import from_dict

    from ds_accel.config import offloads_optimizer, zero_stage

    from_dict(cfg)  # a valid run config
    ds = json.loads(open(cfg["deepspeed"]["config"]).read())
    assert zero_stage(ds) == int(stage[0]) and offloads_optimizer(ds) == offload


def test_report_without_the_step_bench(tmp_path):
    """``--no-step-bench`` (training runs only, e.g. the ZeRO-Offload configs): no bench section, no failure."""
    report = {**_report(), "step_bench": None}
    _, md_path = gpu_check.write_report(report, tmp_path)
    md = md_path.read_text()
    assert "SAT training step" not in md and "## ZeRO-2 offload" in md
    assert gpu_check.failures(report) == ["ZeRO-3 sat: failed", "ZeRO-3 vcycle+sat: loss did not fall"]


@pytest.mark.parametrize("argv,message", [(["--stages", "1,5"],
                                           "no ds_configs/zero5.json; choose among 0, 1, 2, 2_offload"),
                                          (["--methods", "dense,sat-freeze"], "unknown method 'sat-freeze'")])
def test_bad_stage_or_method_is_refused_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["gpu-check", "--out", str(tmp_path / "report"), "--runs", str(tmp_path / "runs"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "runs").exists()


def test_sliced_check_passes_here_and_sees_a_different_function():
    """ds_accel.sliced_check on the CPU: the sliced step is the masked model's to float32 rounding in float32
    and bf16's in bf16, both attention paths taken; and it fails when the reference computes another function
    (one more omitted channel zeroed in the reference than the sliced model omits), or when a check raises."""
    for check in sliced_check.run("cpu"):
        assert check["passed"] and check["paths"] and check["omitted_zero"], check
    real = sliced_check._omitted

    def one_more(kept, n, width=1):
        return real(kept[1:] if width == 1 else kept, n, width)

    sliced_check._omitted = one_more
    try:
        wrong = sliced_check.compare("cpu")
    finally:
        sliced_check._omitted = real
    assert not wrong["passed"] and wrong["gradient"] > wrong["tolerance"], wrong
    broken = gpu_check._sliced_check("no-such-device")
    assert gpu_check.failures({"training": {}, "step_bench": None, "sliced_check": broken})[0].startswith(
        "sliced == masked (?): RuntimeError")


def test_sliced_check_reports_host_syncs():
    """gpu_check.md's "host syncs" cell: dense / sliced where counted (CUDA), n/a elsewhere."""
    assert gpu_check._syncs({"dense": 3, "sliced": 3}) == "3 / 3"
    assert gpu_check._syncs({"dense": None, "sliced": None}) == "n/a" and gpu_check._syncs(None) == "n/a"

"""``ds-accel train`` with ``model.backend: megatron``: Megatron-core GPTModel, Megatron TP (parallel.tp=2) inside a
DeepSpeed ZeRO-1 engine, V-cycle + SAT, stopped inside level 2 and resumed, against the HF backend on one
process (the same seeded weights, data and selection: an independent reference), then exported.

Tolerances: the losses as in test_tensor_parallel.py (rel 1e-4, with optim.eps 1e-3 so Adam's update is
Lipschitz enough in the gradient for TP's reordered sums); the export against the trained Megatron model's
own final validation loss, 1e-5 (a copy of the weights, evaluated in fp32 by two implementations).
"""

import json

import pytest
import torch

from conftest import REPO, tiny_overrides, train_rows
from ranks import run_ranks

ML = {"enabled": True, "width_factor": 1, "step_fractions": [0.25, 0.375, 0.375], "lr_scale": [1.0, 4.0]}
SAT = {"enabled": True, "omission_rate": 0.5, "tp_selection": "global"}
OPTIM = {"micro_batch_size": 4, "eps": 1e-3}


def _run_dict(path, **extra):
    sections = {"optim": OPTIM, "multilevel": ML, "sat": SAT,
                "deepspeed": {"config": str(REPO / "ds_configs" / "zero1.json")}, **extra}
    return tiny_overrides(path, **sections)


@pytest.mark.distributed
def test_megatron_backend_tp2_vcycle_sat_equals_hf_resumes_mid_level_and_exports(tmp_path):
    from transformers import LlamaForCausalLM

    from ds_accel.config import from_dict
    from ds_accel.data import prepare
    from ds_accel.trainer import evaluate

    ref = run_ranks(train_rows, 1, _run_dict(tmp_path / "hf"))[0]
    run = _run_dict(tmp_path / "megatron", model={"preset": "tiny", "backend": "megatron"}, parallel={"tp": 2})
    run["run"]["export"] = True
    run_ranks(train_rows, 2, run, 3)  # stopped at step 3, inside level 2
    rows = run_ranks(train_rows, 2, run, None, True)[0]

    losses = [(r["step"], r["level"], r["omission_rate"], r["loss"]) for r in rows if "loss" in r]
    expected = [(r["step"], r["level"], r["omission_rate"], r["loss"]) for r in ref if "loss" in r]
    assert [lv for _, lv, _, _ in expected] == [1, 1, 2, 2, 2, 1, 1, 1]
    assert max(rate for _, _, rate, _ in expected) == 0.5
    assert [x[:3] for x in losses] == [x[:3] for x in expected]
    for (step, _, _, got), (_, _, _, want) in zip(losses, expected):
        assert got == pytest.approx(want, rel=1e-4), step
    assert [r["transition"] for r in rows if "transition" in r] == ["coalesce", "decoalesce+interpolate"]
    out = tmp_path / "megatron"
    assert json.loads((out / "result.json").read_text())["layout"] == \
        {"data_parallel": 1, "tensor_parallel": 2, "pipeline_parallel": 1}
    assert (out / "checkpoints" / "step000003" / "mp_rank_01_model_states.pt").exists()

    cfg = from_dict(run)
    exported = LlamaForCausalLM.from_pretrained(out / "export", torch_dtype=torch.float32)
    assert exported.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)  # 2 KV heads x 16, gathered whole
    final_val = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    assert evaluate(exported, prepare(cfg.data).val, cfg, 0, 1) == pytest.approx(final_val, abs=1e-5)


def test_megatron_backend_refuses_what_cannot_work_naming_the_field(tmp_path):
    """Before any work: the config alone (validate), or with its DeepSpeed JSON (the trainer's layout check)."""
    from ds_accel.config import ConfigError, from_dict
    from ds_accel.engine.build import resolve_ds_config
    from ds_accel.megatron.engine import check_config

    def megatron(**extra):
        return _run_dict(tmp_path, model={"preset": "tiny", "backend": "megatron"}, **extra)

    for extra, message in [
        ({"parallel": {"pp": 2}}, r"parallel\.pp: pipeline stages are not supported with model\.backend megatron"),
        ({"multilevel": {**ML, "optimizer_policy": "transfer"}}, r"multilevel\.optimizer_policy: .* use fresh"),
        ({"parallel": {"tp": 0}}, r"parallel\.tp: must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict(megatron(**extra))
    with pytest.raises(ConfigError, match=r"parallel\.tp: Megatron tensor parallelism needs model\.backend megatron"):
        from_dict(_run_dict(tmp_path, parallel={"tp": 2}))
    for ds_json, extra, message in [
        ("zero2.json", {}, r"deepspeed\.config: ZeRO stage 2 with model\.backend megatron"),
        ("zero3.json", {}, r"deepspeed\.config: ZeRO stage 3 with model\.backend megatron"),
        ("tp2.json", {}, r"deepspeed\.config: tensor_parallel\.autotp_size with model\.backend megatron"),
        ("zero1.json", {"parallel": {"tp": 4}}, r"data\.vocab_size: 510 is not divisible by parallel\.tp=4"),
    ]:
        cfg = from_dict({**megatron(**extra), "deepspeed": {"config": str(REPO / "ds_configs" / ds_json)},
                         "data": {"seq_len": 32, "max_chars": 120_000, "vocab_size": 510}})
        with pytest.raises(ConfigError, match=message):
            check_config(cfg, resolve_ds_config(cfg, 1))


def _gpu_check_engines():
    from ds_accel.megatron import gpu_check, init_parallel

    init_parallel(1)
    return {backend: gpu_check._engine(backend, "tiny", 64, 4, 0.5, 3, 12) for backend in ("hf", "megatron")}


@pytest.mark.distributed
def test_megatron_gpu_check_engines_run_here():
    """The engine part of ``python -m ds_accel.megatron.gpu_check`` on one CPU rank (the rest needs CUDA): both
    backends build a bf16 ZeRO-1 engine with SAT from the same seeded weights and train, so the check cannot
    go stale between GPU sessions unnoticed (it once imported a class that had been replaced). The first
    losses are equal (same weights and tokens), the next within bf16 rounding; host syncs are counted on
    CUDA only."""
    runs = run_ranks(_gpu_check_engines, 1)[0]
    hf, megatron = runs["hf"], runs["megatron"]
    assert hf["losses"][0] == pytest.approx(megatron["losses"][0], rel=1e-6)
    assert hf["losses"] == pytest.approx(megatron["losses"], rel=1e-3)
    assert hf["layers"] == megatron["layers"] == 4
    assert hf["host_syncs_per_step"] is None and megatron["host_syncs_per_step"] is None

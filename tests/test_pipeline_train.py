"""The trainer with pipeline parallelism (pp=2 on 2 gloo ranks): dense and SAT runs reproduce the
single-process trainer step by step (SAT selects per stage, from the stage's own activations), and
the export merges the stages into one loadable HF directory."""

import json
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides, train_rows
from ranks import run_ranks

SAT = {"enabled": True, "granularity": "kv_group"}


def _train(cfg_dict):
    from ds_accel.config import from_dict
    from ds_accel.trainer import train

    result = train(from_dict(cfg_dict))
    path = Path(cfg_dict["run"]["output_dir"], "metrics.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else None
    return rows, result


def _train_counting_blocks(cfg_dict):
    """``_train``, and how often this rank ran a decoder block's forward with autograd on: the training
    forwards and their recomputations, not the evaluations (``eval_batch`` runs under no_grad)."""
    import torch

    from ds_accel.parallel.pipeline import LlamaPipeBlock

    runs, forward = [0], LlamaPipeBlock.forward

    def counting(self, hidden_states):
        runs[0] += torch.is_grad_enabled()
        return forward(self, hidden_states)

    LlamaPipeBlock.forward = counting
    try:
        return (*_train(cfg_dict), runs[0])
    finally:
        LlamaPipeBlock.forward = forward


def _curve(rows):
    return [(r["step"], r["loss"], r.get("val_loss"), r["step_flops"], r["omission_rate"]) for r in rows if "loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize("sat", [False, True], ids=["dense", "sat"])
def test_pipeline_trainer_matches_one_process(tmp_path, sat):
    """pp=2 against one process at the default ``optim.eps`` (1e-8); with SAT also against the method driven
    by hand in float64 (tests/reference.py: LORS 0.5 .. 0 over 8 steps, importance, whole-GQA-group top-k
    per layer, which each stage does for its own layers, masked dense model, torch AdamW with the freeze
    write-back), so an optimizer-path bug that the V-cycle test's larger eps would damp cannot hide.

    Tolerance of the reference comparison, from float error (tests/test_reference_sat.py argues it): the
    stages' gradients, the tied embedding's two halves and the clipping norm are summed in another order
    than in one process, and Adam turns a gradient rounding d into up to lr d / (4 eps) near |g| = eps;
    the same reference in float32 measures float32's own deviation from float64 (e32: largest and RMS
    weight error in units of lr), and the run's exported weights must stay within 2 e32 (the largest error
    within 4 e32, as reference.assert_within_float_error argues; losses: 2 e32 + 4 float32 ulps). A stage stepping with a missing micro-batch, or the tied head's gradient left out of
    the embedding, is an error of order lr.

    The SAT run also recomputes: pp2.json with ``activation_checkpoint_interval: 1`` (DeepSpeed's pipeline
    engine reads it from the config) runs every decoder block's forward again in the backward, inside
    the sliced step, so the slices, the importance recorded twice per micro-batch and the step must
    come out as without it (the reference does not recompute). Counted: each rank runs its blocks'
    forward twice per micro-batch and step, where the dense run (interval 0) runs it once."""
    extra = {"sat": SAT} if sat else {}
    ds_config = json.loads((REPO / "ds_configs" / "pp2.json").read_text())
    ds_config["pipeline"]["activation_checkpoint_interval"] = 1 if sat else 0
    (tmp_path / "pp2.json").write_text(json.dumps(ds_config))
    single = tiny_overrides(tmp_path / "single", optim={"grad_accum": 2}, run={"export": True}, **extra)
    piped = tiny_overrides(tmp_path / "pp2", optim={"grad_accum": 2}, run={"export": True}, parallel={"pp": 2},
                           deepspeed={"config": str(tmp_path / "pp2.json")}, **extra)
    ref_rows, ref = run_ranks(_train, 1, single)[0]
    ranks = run_ranks(_train_counting_blocks, 2, piped)
    rows, result, _ = ranks[0]
    blocks_per_stage, steps, micro_batches = 2, piped["run"]["total_steps"], 2  # the tiny preset's 4 layers
    forwards = [n for *_, n in ranks]
    assert forwards == [(2 if sat else 1) * blocks_per_stage * steps * micro_batches] * 2, forwards
    for (s1, l1, v1, f1, r1), (s2, l2, v2, f2, r2) in zip(_curve(ref_rows), _curve(rows), strict=True):
        assert (s1, f1, r1) == (s2, f2, r2)  # same steps, FLOPs actually computed and omission rates
        assert l2 == pytest.approx(l1, rel=2e-5) and (v1 is None) == (v2 is None)
        assert v1 is None or v2 == pytest.approx(v1, rel=2e-5)
    if sat:
        assert {r for *_, r in _curve(rows)} >= {0.5, 0.0}
        from reference import check_sat_run

        assert "eps" not in piped["optim"]
        check_sat_run(piped, rows, result["export_dir"])

    import torch
    from ds_accel.engine.export import load_exported

    a, b = load_exported(ref["export_dir"]), load_exported(result["export_dir"])
    x = torch.arange(16).reshape(1, 16)
    assert torch.allclose(a(x).logits, b(x).logits, rtol=1e-4, atol=1e-5)


def test_pipeline_layout_errors(tmp_path):
    from ds_accel.config import ConfigError, from_dict
    from ds_accel.trainer import train

    with pytest.raises(ConfigError, match="parallel.pp"):
        from_dict(tiny_overrides(tmp_path, parallel={"pp": 0}))
    pp2 = {"config": str(REPO / "ds_configs" / "pp2.json")}
    three_levels = from_dict(tiny_overrides(tmp_path / "ml3", parallel={"pp": 2}, deepspeed=pp2,
                                            multilevel={"enabled": True, "levels": 3, "width_factor": 1,
                                                        "step_fractions": [0.2, 0.2, 0.2, 0.2, 0.2],
                                                        "lr_scale": [1.0, 2.0, 4.0]}))
    with pytest.raises(ConfigError, match=r"^parallel\.pp: 2 pipeline stages need at least 2 decoder layers, "
                                          r"V-cycle level 3 has 1; .*multilevel\.depth_factor=1"):
        train(three_levels)  # tiny: 4 layers, 2 at level 2, 1 at level 3
    assert not (tmp_path / "ml3").exists(), "the layout error came after work had started"
    zero3 = from_dict(tiny_overrides(tmp_path / "z3", parallel={"pp": 2},
                                     deepspeed={"config": str(REPO / "ds_configs" / "zero3.json")}))
    with pytest.raises(ConfigError, match="ZeRO-2/3 are incompatible with pipeline parallelism"):
        train(zero3)


@pytest.mark.distributed
def test_pipeline_vcycle_with_sat_matches_one_process_and_resumes_mid_level(tmp_path):
    """V-cycle + SAT under pp=2: level 2 (2 layers) re-partitions over the same 2 stages, the
    transitions move parameters between stages that hold different layers at the two levels (half
    pairing pairs layer 0 with 2, on the other stage), tied embedding/head on both end stages."""
    ml = {"enabled": True, "step_fractions": [0.25, 0.375, 0.375], "lr_scale": [1.0, 4.0]}
    optim = {"eps": 1e-3}  # Adam's g / (|g| + eps) amplifies reduction-order rounding on tiny gradients
    single = tiny_overrides(tmp_path / "single", multilevel=ml, sat=SAT, optim=optim)
    piped = tiny_overrides(tmp_path / "pp2", multilevel=ml, sat=SAT, optim=optim, parallel={"pp": 2},
                           deepspeed={"config": str(REPO / "ds_configs" / "pp2.json")})
    ref = run_ranks(train_rows, 1, single)[0]
    run_ranks(train_rows, 2, piped, 3)  # stops inside level 2
    rows = run_ranks(train_rows, 2, piped, None, True)[0]
    assert [r["level"] for r in ref if "loss" in r] == [1, 1, 2, 2, 2, 1, 1, 1]
    assert [r["transition"] for r in rows if "transition" in r] == ["coalesce", "decoalesce+interpolate"]
    for (s1, l1, v1, f1, r1), (s2, l2, v2, f2, r2) in zip(_curve(ref), _curve(rows), strict=True):
        assert (s1, f1, r1) == (s2, f2, r2)
        assert l2 == pytest.approx(l1, rel=5e-5), s1
        assert v1 is None or v2 == pytest.approx(v1, rel=5e-5), s1
    assert {r for *_, r in _curve(rows)} >= {0.5, 0.0}

"""Planner: Llama-2-7B memory and compute figures worked out by hand from the published shapes."""

import argparse
import json

import pytest

from conftest import REPO, tiny_overrides
from ds_accel.config import ConfigError, MultiLevelConfig, SATConfig, TrainConfig
from ds_accel.models import llama_config
from ds_accel.planner import Layout, Workload, add_parser, make_plan

# Llama-2-7B: hidden 4096, 32 layers, 32 heads (no GQA), MLP 11008, vocab 32000, untied head.
H, L, A, M, V = 4096, 32, 32, 11008, 32000
LAYER = 4 * H * H + 3 * H * M + 2 * H  # q, k, v, o; gate, up, down; two RMSNorms
PARAMS = L * LAYER + 2 * V * H + H  # + embedding, LM head, final norm
S = 4096
SBH = S * 1 * H  # sequence x micro-batch 1 x hidden
ACT_LAYER = 34 * SBH  # Korthikanti et al., 16-bit, flash attention (no s x s scores kept)
# Level 2 (width and depth factor 2): hidden 2048, 16 layers, 16 heads of 128, MLP 5504.
LAYER2 = 4 * 2048 * 2048 + 3 * 2048 * 5504 + 2 * 2048
PARAMS2 = 16 * LAYER2 + 2 * V * 2048 + 2048


def _plan(layout: Layout, work: Workload = Workload(), multilevel: bool = False, sat: bool = False,
          preset: str = "llama2-7b"):
    cfg = TrainConfig(multilevel=MultiLevelConfig(enabled=multilevel), sat=SATConfig(enabled=sat))
    return make_plan(preset, cfg, llama_config(preset, 0), layout, work)


def test_published_parameter_count():
    assert PARAMS == 6_738_415_616


def test_data_parallel_zero1():
    (level,) = _plan(Layout(nodes=1, gpus_per_node=8, zero=1)).levels
    assert level.params == 2 * PARAMS and level.grads == 2 * PARAMS
    assert level.optimizer == pytest.approx(12 * PARAMS / 8, rel=1e-12)
    assert level.activations == L * ACT_LAYER
    assert level.sat_activations is None


def test_zero3_shards_every_model_state():
    (level,) = _plan(Layout(nodes=2, gpus_per_node=8, zero=3)).levels
    assert (level.params, level.grads, level.optimizer) == pytest.approx(
        (2 * PARAMS / 16, 2 * PARAMS / 16, 12 * PARAMS / 16), rel=1e-12)


def test_optimizer_offload_moves_the_optimizer_state_to_the_host():
    (level,) = _plan(Layout(nodes=1, gpus_per_node=8, zero=3, offload=True)).levels
    assert (level.params, level.grads, level.optimizer) == pytest.approx((2 * PARAMS / 8, 2 * PARAMS / 8, 0.0),
                                                                          rel=1e-12)
    assert level.host == pytest.approx(12 * PARAMS / 8, rel=1e-12)
    assert level.total == pytest.approx(4 * PARAMS / 8 + L * ACT_LAYER, rel=1e-12)
    with pytest.raises(ConfigError, match="--offload: .*use --zero 1, 2 or 3"):
        _plan(Layout(nodes=1, gpus_per_node=8, zero=0, offload=True))


def test_tensor_and_pipeline_parallel():
    """tp 2 x pp 2 x dp 2: stage 0 holds 16 half-width layers, half the embedding and 2 micro-batches in flight."""
    (level,) = _plan(Layout(nodes=1, gpus_per_node=8, tp=2, pp=2, zero=1)).levels
    stage0 = 16 * ((LAYER - 2 * H) // 2 + 2 * H) + V * H // 2
    assert (level.stage, level.layers) == (0, 16)
    assert level.params == 2 * stage0 and level.grads == 2 * stage0
    assert level.optimizer == pytest.approx(12 * stage0 / 2, rel=1e-12)
    assert level.activations == 16 * 2 * ACT_LAYER / 2


def test_eager_attention_keeps_the_scores():
    (level,) = _plan(Layout(1, 8), Workload(attention="eager")).levels
    assert level.activations == L * (34 * SBH + 5 * A * S * S)


def test_levels_sat_and_transition():
    plan = _plan(Layout(1, 8), multilevel=True, sat=True)
    one, two = plan.levels
    assert two.params == 2 * PARAMS2
    assert two.activations == 16 * 34 * (S * 2048)
    # r = 0.5 keeps 16 of 32 heads and 5504 of 11008 channels: 10 + 8/2 + 16/2 of the 34 sbh stay
    assert one.sat_activations == L * 22 * SBH
    (t,) = plan.transitions
    assert (t.gathered, t.coalesced) == (4 * LAYER, 4 * LAYER2)


def _flops_per_token(h, layers, q_heads, channels, hd=128):
    """Forward FLOPs per token: LM head + per layer q/k/v/o projections, attention over S, MLP (MHA)."""
    return 2 * h * V + layers * (2 * h * hd * 3 * q_heads + 2 * q_heads * hd * h + 4 * S * hd * q_heads
                                 + 6 * h * channels)


def test_compute_savings():
    plan = _plan(Layout(1, 8), multilevel=True, sat=True)
    dense = _flops_per_token(H, L, 32, M)
    small = _flops_per_token(2048, 16, 16, 5504)
    # 200 steps: V-cycle stages of 20 (level 1), 50 (level 2), 130 (level 1)
    assert plan.vcycle_flops == pytest.approx((150 * dense + 50 * small) / (200 * dense), rel=1e-12)
    # LORS: 100 steps at r=0.5, then four rungs of 25 at 0.5, 1/3, 1/6, 0: ceil((1 - r) n) kept
    kept = [(125, 16, 5504), (25, 22, 7339), (25, 27, 9174), (25, 32, 11008)]
    sat = sum(n * _flops_per_token(H, L, q, c) for n, q, c in kept)
    assert plan.lors_flops == pytest.approx(sat / (200 * dense), rel=1e-12)


@pytest.mark.parametrize("layout, multilevel, preset, words", [
    (Layout(2, 8, tp=16), False, "llama2-13b", "--tp: 16 does not divide the 40 attention heads"),
    (Layout(16, 8, tp=8, pp=2), True, "llama2-70b", "--tp: 8 does not divide the 4 KV heads of level 2; .*1, 2, 4$"),
    (Layout(4, 8, pp=32), True, "llama2-7b", "--pp: 32 stages but level 2 has 16 layers; use --pp <= 16"),
    (Layout(1, 8, pp=2, zero=2), False, "llama2-7b", "--zero: .* refuses ZeRO stage 2"),
    (Layout(1, 6, tp=4), False, "llama2-7b", "--tp/--pp: tp x pp = 4 must divide the 6 ranks"),
])
def test_layout_errors(layout, multilevel, preset, words):
    with pytest.raises(ConfigError, match=words):
        _plan(layout, multilevel=multilevel, preset=preset)


def _cli(argv, capsys) -> str:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_parser(sub)
    args = p.parse_args(["plan", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_table_lists_every_level(tmp_path, capsys):
    run = tiny_overrides(tmp_path / "run", multilevel={
        "enabled": True, "levels": 3, "step_fractions": [0.1, 0.2, 0.4, 0.2, 0.1], "lr_scale": [1.0, 2.0, 4.0]},
        sat={"enabled": True})
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    out = _cli(["--model", "llama2-7b", "--config", str(path), "--seq-len", "4096", "--micro-batch", "1"], capsys)
    for row in ("level 1  4096/32/32/11008/32", "level 2  2048/16/16/5504/16", "level 3  1024/8/8/2752/8",
                "level 1 -> 2:", "level 2 -> 3:", "SAT r=0.5", "ZeRO-0", "V-cycle compute", "SAT compute"):
        assert row in out


def test_cli_reads_zero_and_offload_from_the_configs_deepspeed_json(tmp_path, capsys):
    run = tiny_overrides(tmp_path / "run", deepspeed={"config": str(REPO / "ds_configs" / "zero3_offload.json")})
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    out = _cli(["--model", "llama2-7b", "--config", str(path)], capsys)
    assert "ZeRO-3 + optimizer offload" in out
    assert f"host memory per rank, ZeRO-Offload's optimizer state (GiB): level 1 {12 * PARAMS / 8 / 2**30:.2f}" in out
    assert "optimizer offload" not in _cli(["--model", "llama2-7b", "--zero", "2"], capsys)
    assert "ZeRO-2 + optimizer offload" in _cli(["--model", "llama2-7b", "--zero", "2", "--offload"], capsys)


def test_cli_without_config_is_dense(capsys):
    out = _cli(["--model", "llama2-70b", "--nodes", "16", "--tp", "8", "--pp", "2"], capsys)
    assert "tp 8 x pp 2 x dp 8, ZeRO-1" in out and "level 1  8192/64/8/28672/80" in out
    assert "level 2" not in out and "V-cycle: off" in out
    with pytest.raises(ConfigError, match="--model"):
        _cli(["--model", "llama3"], capsys)
    with pytest.raises(ConfigError, match="--model: required"):
        _cli([], capsys)


@pytest.mark.parametrize("policy,zero,accum", [("freeze", 1, 8), ("adam", 1, 8), ("freeze", 2, 8), ("freeze", 0, 1)])
def test_sat_extra_memory_by_hand(policy, zero, accum):
    """Llama-2-7B, 8 GPUs, bf16, r=0.5, granularity head: half the heads (16 of 32, no GQA) and 5504 of 11008
    channels kept, so exactly half of every layer's projection matrices (4 H^2 + 3 H M) are kept."""
    cfg = TrainConfig(sat=SATConfig(enabled=True, omission_rate=0.5, optimizer_policy=policy))
    plan = make_plan("llama2-7b", cfg, llama_config("llama2-7b", 0), Layout(1, 8, zero=zero),
                     Workload(grad_accum=accum))
    extra = plan.levels[0].sat_extra
    kept = L * (4 * H * H + 3 * H * M) // 2  # parameters in the kept slices, whole model
    assert extra.slices == 2 * kept  # bf16 copies of the kept rows/columns
    assert extra.slice_grads == (2 * kept if zero <= 1 and accum > 1 else 0)  # bf16 gradients, held over the step
    omitted_local = kept / (8 if zero >= 1 else 1)  # the other half, this rank's 1/8 of the optimizer partition
    assert extra.frozen == pytest.approx(12 * omitted_local if policy == "freeze" else 0, rel=1e-12)
    assert extra.slices == pytest.approx(6.03 * 2**30, rel=1e-3)  # 3.24e9 parameters x 2 bytes

"""Tensor parallelism (DeepSpeed AutoTP, tp=2 on 2 gloo ranks, ZeRO-1) against one process on the same
weights and data: SAT's sliced step, under the same selection, gives the same losses, gradients, updated
weights and Adam moments, the gathered importance scores are the single process's, omitted rows stay
frozen in every rank's block; a coalesce -> train -> de-coalesce + interpolate transition gives the same
weights; validate_tp names the field and the fix."""

import json

import pytest
import torch

from conftest import REPO, tiny_overrides, train_rows
from ranks import run_ranks

STEPS = 4
TOL = 1e-5
MOMENTS = ("exp_avg", "exp_avg_sq")


def _config(**changes):
    """The tiny preset with some fields changed (a LlamaConfig recomputes head_dim from them)."""
    from ds_accel.models import llama_config

    base = llama_config("tiny", 512)
    conf = type(base)(**{**base.to_dict(), **changes})
    conf._attn_implementation = "sdpa"
    return conf


def _engine(conf, tp: int, seed: int | None, micro: int = 4):
    """``optim.eps`` 1e-3: Adam's update g / (|g| + eps) turns the 1e-7 rounding differences of TP's
    all-reduces into up to lr / (4 eps) on elements with |g| near eps; with a larger eps the step is
    Lipschitz enough in g for a 1e-5 comparison of the weights."""
    from ds_accel import runtime
    from ds_accel.config import from_dict
    from ds_accel.engine.build import make_engine, new_model, resolve_ds_config

    ds_json = "tp2.json" if tp == 2 else "zero1.json"
    cfg = from_dict(tiny_overrides("/tmp/unused", optim={"micro_batch_size": micro, "weight_decay": 0.1, "eps": 1e-3},
                                   run={"total_steps": 2 * STEPS}, sat={"enabled": True, "optimizer_policy": "freeze"},
                                   deepspeed={"config": str(REPO / "ds_configs" / ds_json)}))
    ds = resolve_ds_config(cfg, runtime.world_size())  # DeepSpeed counts TP ranks in train_batch_size
    return make_engine(new_model(conf, ds, seed=seed), cfg, ds), cfg


def _full(p, local):
    """A TP-local tensor of parameter ``p`` (gradient, moment) gathered into the full tensor."""
    from ds_accel.parallel.tensor import gather_tp, tp_split

    split = tp_split(p)
    return local.float().clone() if split is None else gather_tp(split, local.float())


def _sat_steps(tp: int, replay: list | None):
    """SAT at rate 0.5 for STEPS steps: even steps keep the balanced top-k of 2 shards, odd steps the
    global top-k (which at step 1 keeps every head and channel of rank 0's block and none of rank 1's).
    With ``replay`` (the single process's record) the step uses the recorded selection.

    Adam's moments exist after the first step; DeepSpeed 0.19's ZeRO-1 links only the first parameter
    group's to the parameters, so they are linked for the no-decay group (biases, norms) too after every
    step (``link_optimizer_state``), and every parameter's moments are compared."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state

    from ds_accel.ds_private import link_optimizer_state
    from ds_accel.engine.params import full_param
    from ds_accel.engine.sat import SATController, frozen_fragments
    from ds_accel.sat import select

    def local_copies(p, step):
        """The fp32 master and, after the first step, the Adam moments of this rank's block."""
        return [safe_get_full_fp32_param(p), *(safe_get_full_optimizer_state(p, k) for k in MOMENTS if step > 0)]

    def impose(keep_heads, keep_channels):
        """Replace the selection ``begin_step`` made (and the freeze guard it armed) by the chosen one."""
        sat.keep_heads, sat.keep_channels = keep_heads, keep_channels
        sat.selection = sat.family.resolve(sat.layers, keep_heads, keep_channels, sat.tp.shard if sat.tp else None)
        slices = sat.omitted()
        sat.guard.arm(lambda: frozen_fragments(sat.guard.optimizer, slices))

    def plain(keep):
        return tuple({k: v.tolist() for k, v in d.items()} for d in keep)

    conf = _config(attention_bias=True, mlp_bias=True)
    engine, cfg = _engine(conf, tp, seed=2)
    sat = SATController(cfg.sat, engine.module, cfg.run.total_steps, seed=0)
    sat.attach(engine.optimizer)
    params = dict(engine.module.named_parameters())
    data = torch.randint(0, 512, (STEPS, 4, 32), generator=torch.Generator().manual_seed(7))
    out = {"own": [], "balanced": [], "global": [], "scores": [], "losses": [], "grads": [], "weights": [],
           "moments": [], "frozen": []}
    for step in range(STEPS):
        rate = sat.begin_step(step)
        out["own"].append(plain((sat.keep_heads, sat.keep_channels)))
        out["scores"].append(sat.tracker.flat())
        out["balanced"].append(plain(select(sat.tracker, rate, num_shards=2)))
        out["global"].append(plain(select(sat.tracker, rate)))
        chosen = (replay or out)["balanced" if step % 2 == 0 else "global"][step]
        impose(*({k: torch.tensor(v) for k, v in d.items()} for d in chosen))
        with sat.omitting():
            loss = engine(input_ids=data[step], labels=data[step], use_cache=False).loss
            engine.backward(loss)
        out["losses"].append(loss.item())
        out["grads"].append({n: _full(p, safe_get_full_grad(p)) for n, p in params.items()})
        omitted = sat.omitted()  # this rank's block: compared on the rank's own (TP-local) tensors
        before = [[t.clone() for t in local_copies(s.param, step)] for s in omitted]
        engine.step()
        link_optimizer_state(engine.optimizer)
        sat.end_step()
        for s, saved in zip(omitted, before):
            out["frozen"] += [torch.equal(a.index_select(s.dim, s.index), b.index_select(s.dim, s.index))
                              for a, b in zip(local_copies(s.param, step), saved)]
        out["weights"].append({n: full_param(p) for n, p in params.items()})
        out["moments"].append({f"{n}.{k}": _full(p, safe_get_full_optimizer_state(p, k))
                               for n, p in params.items() for k in MOMENTS})
    engine.destroy()
    return out


def _max_rel(got: dict, ref: dict) -> float:
    """Largest |got - ref| over all tensors, relative to the tensor's largest |ref| entry."""
    return max(((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-12)).item() for n in ref)


@pytest.mark.distributed
def test_sat_tp2_equals_one_process_under_the_same_selection():
    one = run_ranks(_sat_steps, 1, 1, None)[0]
    ranks = run_ranks(_sat_steps, 2, 2, one)
    assert len(one["frozen"]) > 20 and all(one["frozen"])
    assert len(one["moments"][0]) == 2 * len(one["weights"][0]), "every parameter's moments, 1-D ones included"
    assert one["balanced"][2] != one["balanced"][0], "selection never followed the scores"
    for r in ranks:
        assert all(r["frozen"]) and len(r["frozen"]) > 20, "an omitted weight or moment moved in a TP block"
        assert r["own"] == one["balanced"], "tp=2's default (balanced) selection differs from one process'"
        assert r["global"] == one["global"]
        for step in range(STEPS):
            torch.testing.assert_close(r["scores"][step], one["scores"][step], rtol=TOL, atol=1e-7)
            assert r["losses"][step] == pytest.approx(one["losses"][step], rel=TOL)
            for what in ("grads", "weights", "moments"):
                err = _max_rel(r[what][step], one[what][step])
                assert err < TOL, (step, what, err)


def _transition(tp: int):
    """coalesce -> 2 training steps of the small level -> de-coalesce + interpolate, gathered per stage."""
    from ds_accel.engine import transitions as tr
    from ds_accel.engine.params import full_param
    from ds_accel.multilevel import level_map

    conf = _config(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2)
    lmap = level_map(conf, 2, 2, "half")
    large, _ = _engine(conf, tp, seed=1, micro=2)
    small, _ = _engine(lmap.small_config, tp, seed=None, micro=2)
    tr.coalesce_into(large.module, small.module, lmap)
    kept = tr.keep_shards(large.module)
    out = {"small": {n: full_param(p) for n, p in small.module.named_parameters()}}
    data = torch.randint(0, 512, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    for x in data:
        small.backward(small(input_ids=x, labels=x).loss)
        small.step()
    out["trained"] = {n: full_param(p) for n, p in small.module.named_parameters()}
    back, _ = _engine(conf, tp, seed=None, micro=2)
    tr.decoalesce_into(small.module, back.module, lmap, kept, alpha=0.5)
    out["back"] = {n: full_param(p) for n, p in back.module.named_parameters()}
    for engine in (large, small, back):
        engine.destroy()
    return out


@pytest.mark.distributed
def test_transition_tp2_equals_one_process():
    one = run_ranks(_transition, 1, 1)[0]
    ranks = run_ranks(_transition, 2, 2)
    assert _max_rel(one["trained"], one["small"]) > 1e-4, "the small level did not train"
    for r in ranks:
        for stage in ("small", "trained", "back"):
            assert r[stage].keys() == one[stage].keys()
            err = _max_rel(r[stage], one[stage])
            assert err < TOL, (stage, err)


def test_validate_tp_names_the_field_and_the_fix():
    from ds_accel.config import ConfigError, MultiLevelConfig
    from ds_accel.multilevel.vcycle import level_configs
    from ds_accel.parallel.tensor import validate_tp

    tiny = _config()  # 4 heads, 2 KV heads, 176 channels; level 2: 2 heads, 1 KV head, 88 channels
    levels = level_configs(tiny, MultiLevelConfig(enabled=True))
    validate_tp(tiny, 2)
    validate_tp(_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=4), 2,
                level_configs(_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=4),
                              MultiLevelConfig(enabled=True)))
    with pytest.raises(ConfigError, match=r"parallel\.tp: 2 does not divide the 1 KV heads of V-cycle level 2; "
                                          r"use a tp that divides .*: 1 \(or use fewer multilevel\.levels\)"):
        validate_tp(tiny, 2, levels)
    with pytest.raises(ConfigError, match=r"parallel\.tp: 4 does not divide the 2 KV heads of the model"):
        validate_tp(tiny, 4)
    with pytest.raises(ConfigError, match=r"4 does not divide the 174 MLP channels \(intermediate_size\) of the model"):
        validate_tp(_config(intermediate_size=174, num_key_value_heads=4), 4)
    with pytest.raises(ConfigError, match=r"parallel\.tp: must be >= 1"):
        validate_tp(tiny, 0)


@pytest.mark.distributed
def test_trainer_vcycle_and_sat_tp2_equal_one_process_and_resume_mid_level(tmp_path):
    """The whole trainer under tp=2 (ds_configs/tp2.json): a V-cycle in depth (TP splits heads, so the
    levels keep their width here) with SAT at the global top-k, which is then the single process's
    selection; stopped inside level 2 and resumed from DeepSpeed's TP checkpoint. The exports are compared
    too (TP blocks gathered whole and in order): every parameter within 1e-4 of its tensor's largest
    entry, the losses' tolerance (measured 3e-7 between uninterrupted runs)."""
    ml = {"enabled": True, "width_factor": 1, "step_fractions": [0.25, 0.375, 0.375], "lr_scale": [1.0, 4.0]}
    sat = {"enabled": True, "omission_rate": 0.5, "tp_selection": "global"}
    optim = {"micro_batch_size": 4, "eps": 1e-3}

    def run_dict(name, ds_json):
        return tiny_overrides(tmp_path / name, optim=optim, multilevel=ml, sat=sat,
                              deepspeed={"config": str(REPO / "ds_configs" / ds_json)})

    single = run_dict("single", "zero1.json")
    stopped = run_dict("tp2", "tp2.json")
    single["run"]["export"] = stopped["run"]["export"] = True
    ref = run_ranks(train_rows, 1, single)[0]
    run_ranks(train_rows, 2, stopped, 3)
    rows = run_ranks(train_rows, 2, stopped, None, True)[0]
    losses = [(r["step"], r["level"], r["omission_rate"], r["loss"]) for r in rows if "loss" in r]
    expected = [(r["step"], r["level"], r["omission_rate"], r["loss"]) for r in ref if "loss" in r]
    assert [lv for _, lv, _, _ in expected] == [1, 1, 2, 2, 2, 1, 1, 1]
    assert max(rate for _, _, rate, _ in expected) == 0.5
    assert [x[:3] for x in losses] == [x[:3] for x in expected]
    for (step, _, _, got), (_, _, _, want) in zip(losses, expected):
        assert got == pytest.approx(want, rel=1e-4), step
    assert [r["transition"] for r in rows if "transition" in r] == ["coalesce", "decoalesce+interpolate"]
    layout = json.loads((tmp_path / "tp2" / "result.json").read_text())["layout"]
    assert layout == {"data_parallel": 1, "tensor_parallel": 2, "pipeline_parallel": 1}
    assert (tmp_path / "tp2" / "checkpoints" / "step000003" / "mp_rank_01_model_states.pt").exists()
    from transformers import LlamaForCausalLM

    exported, expected_model = (dict(LlamaForCausalLM.from_pretrained(tmp_path / name / "export").named_parameters())
                                for name in ("tp2", "single"))
    assert exported.keys() == expected_model.keys()
    assert _max_rel(exported, expected_model) < 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage,policy", [(1, "adam"), (2, "freeze")])
def test_trainer_sat_tp2_at_the_default_eps_matches_the_method_by_hand(tmp_path, zero_stage, policy):
    """The trainer under tp=2 at the real ``optim.eps`` (1e-8), against SAT driven by hand in float64
    (tests/reference.py: LORS, importance, the balanced top-k over the 2 TP blocks, masked dense model,
    torch AdamW, with the freeze write-back under ``freeze``), so that an optimizer-path bug that a larger
    eps would damp cannot hide: 4 steps at rates 0.5, 0.5, 0.5, 0, gradient accumulation 2, weight decay,
    clipping. tp2.json's ZeRO-1 with the default ``adam`` policy, and ZeRO-2 (gradients reduced at every
    backward, partitioned over the data-parallel group of one) with ``freeze``.

    Tolerance from float error, as tests/test_reference_sat.py argues: TP sums the row-parallel partial
    outputs and the replicated parameters' gradients in another order than one process, and Adam turns a
    gradient rounding d into up to lr d / (4 eps) near |g| = eps; the same reference in float32 measures
    how far float32 lands from float64 (e32, largest and RMS weight error in units of lr), and the run must
    stay within 2 e32 of the float64 reference (the largest error within 4 e32, as
    reference.assert_within_float_error argues; losses: 2 e32 + 4 float32 ulps). A TP block updated with
    the other block's gradient, a missed all-reduce or a moment fragment left unfrozen is an error of order
    lr on whole rows, far outside it."""
    from reference import check_sat_run

    cfg = tiny_overrides(tmp_path / "tp2", run={"total_steps": 4, "eval_every": 4, "export": True},
                         optim={"micro_batch_size": 2, "grad_accum": 2, "weight_decay": 0.1},
                         sat={"enabled": True, "omission_rate": 0.5, "stage1_fraction": 0.5, "rungs": 2,
                              "optimizer_policy": policy},
                         deepspeed={"config": str(tmp_path / "tp2.json")})
    ds_config = json.loads((REPO / "ds_configs" / "tp2.json").read_text())
    ds_config["zero_optimization"]["stage"] = zero_stage
    (tmp_path / "tp2.json").write_text(json.dumps(ds_config))
    assert "eps" not in cfg["optim"]
    rows = run_ranks(train_rows, 2, cfg)[0]
    check_sat_run(cfg, rows, tmp_path / "tp2" / "export", shards=2)

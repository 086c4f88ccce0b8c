"""bf16 on 2 CPU ranks: ``model.dtype: bf16`` (DeepSpeed's bf16 engine: bf16 weights and activations, fp32
master weights and Adam moments) under ZeRO-1 and ZeRO-3, V-cycle with SAT. Each run trains, stops
inside level 2 and resumes onto the uninterrupted run's losses, and exports a HF directory that
``LlamaForCausalLM.from_pretrained`` loads and that computes the run's final validation loss.

Tolerances (measured on this machine, 2026-11-27: first loss 6.244, final validation loss 5.691 after
8 steps; it was 6.015 at step 4, so stale or wrong weights move it by far more than these):
- resumed vs uninterrupted loss: the checkpoint holds the fp32 masters, the moments and the bf16
  weights, and the resumed steps repeat the same operations: bit for bit under both stages (measured).
  rel 1e-6 leaves room only for a reordered reduction; before 0aa1a48 ZeRO-1 differed by 6e-5 in the
  last two steps (the freeze guard read stale moment fragments for one step after the resume), which
  this catches;
- the export loaded in bf16 holds the engine's own bf16 weights (DeepSpeed's model copy is the
  round-to-nearest of the fp32 masters that export writes), so its loss on the evaluation blocks is
  the run's final validation loss up to the batch shape (one batch of 16 blocks instead of 2 ranks x
  2 micro-batches of 4): measured 3e-6 and 8e-8, rel 1e-4; loaded in fp32 (the masters, activations
  not rounded) it moves by the bf16 roundings of a near-uniform prediction: measured 3e-5, rel 1e-3.
"""

import math

import pytest
import torch

from conftest import REPO, tiny_overrides, train_rows
from ranks import run_ranks

ML = {"enabled": True, "step_fractions": [0.25, 0.375, 0.375], "lr_scale": [1.0, 4.0]}


def test_auto_dtype_follows_the_accelerator(monkeypatch):
    """auto: bf16 on an accelerator with native bf16, fp32 on one without and on the CPU accelerator."""
    import deepspeed.accelerator

    from ds_accel.models import resolve_dtype

    assert resolve_dtype("auto") == torch.float32  # this machine: DeepSpeed's CPU accelerator
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("fp32") == torch.float32

    class Accelerator:
        def __init__(self, name, bf16):
            self.name, self.bf16 = name, bf16

        def device_name(self):
            return self.name

        def is_bf16_supported(self):
            return self.bf16

    for name, bf16, expected in (("cuda", True, torch.bfloat16), ("cuda", False, torch.float32),
                                 ("cpu", True, torch.float32)):
        monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator(name, bf16))
        assert resolve_dtype("auto") == expected, (name, bf16)


def _losses(rows):
    return [(r["step"], r["level"], r["loss"]) for r in rows if "loss" in r]


def _export_losses(cfg_dict: dict, blocks: int) -> tuple[float, float]:
    """The exported model's mean loss on the first ``blocks`` validation blocks, loaded in bf16 and in fp32."""
    from transformers import LlamaForCausalLM

    from ds_accel.config import from_dict
    from ds_accel.data import prepare

    x = prepare(from_dict(cfg_dict).data).val[:blocks]
    losses = []
    for dtype in (torch.bfloat16, torch.float32):
        model = LlamaForCausalLM.from_pretrained(f"{cfg_dict['run']['output_dir']}/export", dtype=dtype)
        with torch.no_grad():
            losses.append(model(input_ids=x, labels=x, use_cache=False).loss.float().item())
    return losses[0], losses[1]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_vcycle_sat_trains_resumes_and_exports(tmp_path, stage):
    def run_dict(name):
        return tiny_overrides(tmp_path / name, model={"dtype": "bf16"}, optim={"micro_batch_size": 4},
                              multilevel=ML, sat={"enabled": True}, run={"export": True},
                              deepspeed={"config": str(REPO / "ds_configs" / f"zero{stage}.json")})

    whole = run_dict("whole")
    ref_rows = run_ranks(train_rows, 2, whole)[0]
    ref = _losses(ref_rows)
    assert [lv for _, lv, _ in ref] == [1, 1, 2, 2, 2, 1, 1, 1]
    assert all(math.isfinite(loss) for _, _, loss in ref)
    final_val = ref_rows[-1]["val_loss"]
    assert final_val < ref[0][2] - 0.3, f"bf16 did not train: first loss {ref[0][2]:.3f}, final val {final_val:.3f}"

    stopped = run_dict("stopped")
    run_ranks(train_rows, 2, stopped, 3)  # stops inside level 2, after the first transition
    resumed = _losses(run_ranks(train_rows, 2, stopped, None, True)[0])
    assert [s for s, _, _ in resumed] == list(range(1, 9))
    for (s1, lv1, l1), (s2, lv2, l2) in zip(ref, resumed):
        assert (s1, lv1) == (s2, lv2) and l2 == pytest.approx(l1, rel=1e-6), (s1, l1, l2)

    # evaluate(): 2 micro-batches of 4 blocks per rank, ranks interleaved: the first 16 validation blocks
    as_bf16, as_fp32 = _export_losses(whole, blocks=2 * 2 * 4)
    assert as_bf16 == pytest.approx(final_val, rel=1e-4)
    assert as_fp32 == pytest.approx(final_val, rel=1e-3)


def _first_adamw_step_under_zero0_bf16(weight_decay: float) -> dict:
    """Build a bf16 ZeRO-0 engine (DeepSpeed's FP16_UnfusedOptimizer around torch's AdamW) and take one
    step; returns the fp32 masters before the engine, after it was built and after the step, and
    Adam's step counts."""
    from ds_accel.config import TrainConfig
    from ds_accel.engine.build import make_engine
    from ds_accel.engine.transitions import adam_step, inner_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(torch.bfloat16)
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay = 1e-3, weight_decay
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 0}}
    before = [p.detach().float().clone() for p in model.parameters()]
    engine = make_engine(model, cfg, ds)
    masters = [p for group in inner_optimizer(engine.optimizer).param_groups for p in group["params"]]
    built = [p.detach().clone() for p in masters]
    steps = [adam_step(engine.optimizer)]
    x = torch.randn(8, 16).to(torch.bfloat16)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    steps.append(adam_step(engine.optimizer))
    return {"wrapper": type(engine.optimizer).__name__, "before": before, "built": built,
            "stepped": [p.detach().clone() for p in masters], "steps": steps}


def test_first_adamw_step_under_zero0_bf16_is_adamws_first():
    """DeepSpeed's bf16 wrapper without ZeRO steps the optimizer once with zero gradients while it is built.
    That step must leave no trace (engine.build): the masters equal the model's weights, Adam's count is
    0, and the first real step is AdamW's first: decay by lr * wd, then lr * g / (|g| + eps), i.e. lr per
    element whose gradient is far above eps. (Counted as step 1, the construction step made the first
    update (1 - b1) / (1 - b1^2) / sqrt((1 - b2) / (1 - b2^2)) = 0.74 of that, and the decay applied twice.)"""
    lr, wd = 1e-3, 0.1
    out = run_ranks(_first_adamw_step_under_zero0_bf16, 1, wd)[0]
    assert out["wrapper"] == "FP16_UnfusedOptimizer"  # the case this guards; ZeRO-1..3 take no such step
    assert out["steps"] == [0, 1]
    shapes = sorted(tuple(p.shape) for p in out["before"])
    assert shapes == sorted(tuple(p.shape) for p in out["built"])
    for built in out["built"]:
        match = [b for b in out["before"] if b.shape == built.shape and torch.equal(b, built)]
        assert match, "the masters moved while the engine was built"
    decay = {2: 1 - lr * wd, 1: 1.0}  # weight decay on matrices only (engine.build.param_groups)
    for built, stepped in zip(out["built"], out["stepped"]):
        update = (built * decay[built.dim()] - stepped) / lr
        moved = update.abs()
        assert torch.quantile(moved.flatten(), 0.1) > 0.99 and moved.max() < 1.01, moved

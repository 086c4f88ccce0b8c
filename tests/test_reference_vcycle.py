"""One V-cycle of the trainer against the algorithm driven by hand.

The reference (tests/reference.py) is plain torch in one process: the tiny preset from the trainer's
seeded weights, the trainer's data order (``BlockSampler``), per step the micro-batches' mean loss,
clipping and torch's AdamW at an LR worked out here from the documented schedule, and between the stages
the pure operators on HF models (``coalesce``, then ``decoalesce`` + ``interpolate`` with the level-1
weights kept at coalescing), each stage with a new AdamW (``optimizer_policy: fresh``). The trainer runs
the same config through ``ds_accel.trainer.train`` (DeepSpeed ZeRO-0, one process) and checkpoints every
3 steps: the checkpoints at steps 3 and 6 are the last steps of stages 1 and 2 (written before the
transition), 9 is inside the last stage, 12 the end. Compared: every step's LR and loss (the first loss
of a stage is the first forward of the transition's output), and weights and Adam moments at 3, 6, 9, 12.

Tolerance. The trainer is float32: its sums run in another order than the reference's (DeepSpeed's
clipping norm, the operators applied per parameter instead of per state dict), and Adam amplifies an
absolute gradient error d by up to lr d / (4 eps) where |g| is near eps = 1e-8 (the derivative of
g / (|g| + eps) peaks there), which compounds over the steps. So the size of "float32 accuracy" is
measured, not guessed: the same reference run in float32 deviates from the float64 one by e32 (per
quantity of :func:`reference.deviation`: largest and RMS weight error in units of the peak LR, largest
moment error relative to the moment's largest entry; e32 grows from 0.016 lr at step 3 to 0.13 lr at
step 12 in the largest weight error, 5e-5 to 6e-4 lr RMS). The trainer must stay within 2 e32 of the
float64 reference, every quantity, every checkpoint: both are float32 computations of one algorithm
(measured: the trainer sits at 0.97-1.09 e32, and about 0.05 e32 from the float32 reference). A wrong
LR on one step, a missed micro-batch, a transposed operator or a stale optimizer state moves every
weight by a good fraction of lr (measured: the LR of one step 20% off gives 0.16 lr RMS at step 9, alpha
0.25 for 0.5 gives 2.3 lr), hundreds of times the 2 e32 RMS bound. The losses, single float32 numbers
that two float32 computations of one value can round a few units in the last place apart whatever e32
is, are held to 2 e32 + 4 ulp (2^-23 relative each).
"""

import json

import pytest
import torch

from conftest import tiny_overrides
from reference import ULP32, Reference, checkpoint_state, deviation, one_thread, seeded_model, warmup_cosine

TOTAL, MICRO, ACCUM, LR, SEED = 12, 2, 2, 3e-3, 0
ML = {"enabled": True, "levels": 2, "width_factor": 2, "depth_factor": 2, "pairing": "half",
      "step_fractions": [0.25, 0.25, 0.5], "lr_scale": [1.0, 2.0], "lr_schedule": "stage", "lr_decay": "cosine",
      "transition_warmup": 2, "alpha": 0.5, "optimizer_policy": "fresh"}
OPTIM = {"lr": LR, "warmup_steps": 2, "min_lr_ratio": 0.1, "weight_decay": 0.1, "micro_batch_size": MICRO,
         "grad_accum": ACCUM}
STAGES = [(0, 3, 1, 2), (3, 6, 2, 2), (6, 12, 1, 2)]  # (start, end, level, warm-up steps), by hand from ML
CHECKPOINTS = (3, 6, 9, 12)


def _lr(step: int) -> float:
    """The documented per-stage schedule (``lr_schedule: stage``): the level's peak LR x lr_scale, a linear
    warm-up (optim.warmup_steps in the first stage, transition_warmup after a transition), then a cosine to
    min_lr_ratio of the peak within the stage."""
    start, end, level, warmup = next(s for s in STAGES if s[0] <= step < s[1])
    return LR * ML["lr_scale"][level - 1] * warmup_cosine(step - start, end - start, warmup, OPTIM["min_lr_ratio"])


def _by_hand(cfg, corpus, dtype):
    """The V-cycle in plain torch: the loss of every step and {step: state} at the checkpoint steps."""
    from ds_accel.data import BlockSampler
    from ds_accel.models import model_config
    from ds_accel.multilevel import coalesce, decoalesce, interpolate

    sampler = BlockSampler(len(corpus.train), MICRO, ACCUM, 1, SEED)
    conf = model_config(cfg.model, corpus.vocab_size)
    ref = Reference(seeded_model(conf, SEED, dtype), cfg.optim, dtype)
    losses, states = [], {}
    for start, end, level, _ in STAGES:
        if start == 3:
            large = ref.model  # level 1 at coalescing: interpolation's theta_L
            ref.restart(coalesce(large, 2, 2, "half"))
        elif start == 6:
            ref.restart(interpolate(large, decoalesce(ref.model, conf, "half"), ML["alpha"]))
        for t in range(start, end):
            losses.append(ref.step([corpus.train[sampler.indices(t, a, 0)] for a in range(ACCUM)], _lr(t)))
            if t + 1 in CHECKPOINTS:
                states[t + 1] = ref.state()
    return losses, states, conf


def test_vcycle_trainer_equals_the_algorithm_by_hand(tmp_path):
    from ds_accel.config import from_dict
    from ds_accel.data import prepare
    from ds_accel.multilevel.vcycle import plan
    from ds_accel.trainer import train

    out = tmp_path / "run"
    cfg = from_dict(tiny_overrides(out, optim=OPTIM, multilevel=ML,
                                   run={"total_steps": TOTAL, "eval_every": TOTAL, "seed": SEED, "save_every": 3,
                                        "keep_checkpoints": len(CHECKPOINTS)}))
    with one_thread():
        corpus = prepare(cfg.data)
        ref_losses, ref_states, conf = _by_hand(cfg, corpus, torch.float64)
        f32_losses, f32_states, _ = _by_hand(cfg, corpus, torch.float32)
        train(cfg)
    assert [(s.start, s.end, s.level) for s in plan(conf, cfg.multilevel, TOTAL)] == [s[:3] for s in STAGES]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["transition"] for r in rows if "transition" in r] == ["coalesce", "decoalesce+interpolate"]
    assert [r["level"] for r in rows if "loss" in r] == [1, 1, 1, 2, 2, 2] + [1] * 6
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([_lr(t) for t in range(TOTAL)], rel=1e-12)
    losses = [r["loss"] for r in rows if "loss" in r]
    loss_f32 = max(abs(a - b) / b for a, b in zip(f32_losses, ref_losses))
    loss_err = max(abs(a - b) / b for a, b in zip(losses, ref_losses))
    assert loss_err <= 2 * loss_f32 + 4 * ULP32, (loss_err, loss_f32)

    for step in CHECKPOINTS:
        got = checkpoint_state(out / "checkpoints" / f"step{step:06d}" / "mp_rank_00_model_states.pt")
        assert got.keys() == ref_states[step].keys(), step  # the level: names and count of layers
        f32 = deviation(f32_states[step], ref_states[step], LR)
        assert f32["weight"] < 0.3 and f32["moment"] < 1e-2, f"the float32 reference itself is far off at {step}"
        assert all(m is not None for _, *moments in got.values() for m in moments), "moments missing"
        err = deviation(got, ref_states[step], LR)
        assert all(err[k] <= 2 * f32[k] for k in err), (step, err, f32)

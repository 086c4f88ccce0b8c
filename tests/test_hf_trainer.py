"""SATCallback in real transformers.Trainer runs: the step computes only the selected units (omitted
gradients exactly zero, omitted weights and Adam moments bit-identical under AdamW weight decay, kept
columns trained), the logged rate is LORS's, evaluation runs dense, rate 0 equals a plain Trainer run
bit for bit, and the same holds under DeepSpeed ZeRO-1, 2 and 3 on 2 gloo ranks, where accelerate steps the
engine inside the last micro-batch's backward and both ranks must select the same units."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from ds_accel.config import SATConfig
from ds_accel.integrations import SATCallback
from ds_accel.sat import LORS, decoder_layers, omitted_slices
from ranks import run_ranks

MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero(stage: int, offload: bool = False) -> dict:
    """``offload``: ZeRO-Offload with the Trainer's own torch AdamW on the host state; without
    ``zero_force_ds_cpu_optimizer: false`` accelerate would swap in DeepSpeedCPUAdam, a C++ op built at its
    first use (README, ZeRO-Offload)."""
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, **({"zero_force_ds_cpu_optimizer": False} if offload else {})}


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=176, vocab_size=512, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 512, (n, 32), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": t, "labels": t} for t in tokens]


def _args(out: str, steps: int, **extra) -> TrainingArguments:
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_steps=1, learning_rate=1e-2, weight_decay=0.1,
                             disable_tqdm=True, **extra)


def _swapped(model) -> bool:
    """Whether any attention or MLP module still runs omit()'s sliced forward."""
    return any("forward" in vars(m) for layer in decoder_layers(model).values() for m in (layer.self_attn, layer.mlp))


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter (gathered under ZeRO-3; collective there)."""
    from ds_accel.engine.params import full_param

    return full_param(p) if hasattr(p, "ds_id") else p.detach().clone()


def _moments(p: torch.Tensor, optimizer, stepped: bool) -> dict[str, torch.Tensor]:
    """Adam moments of ``p``; none before the first optimizer step (ZeRO-1/2 link them at that step)."""
    if not stepped:
        return {}
    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):  # ZeRO-1/2/3: from every rank's part (collective)
        from deepspeed.utils import safe_get_full_optimizer_state

        state = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
    else:
        state = optimizer.optimizer.state.get(p, {})
    return {k: v.clone() for k, v in state.items() if k in MOMENTS and v is not None}


def _omitted(t: torch.Tensor, s) -> torch.Tensor:
    return t.index_select(s.dim, s.index)


class Probe(TrainerCallback):
    """Registered after SATCallback: records, per optimizer step, what the selection did to the model."""

    def __init__(self, sat: SATCallback) -> None:
        self.sat, self.steps, self.eval_dense = sat, [], []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        c = self.sat.controller
        self.slices = omitted_slices(model, c.keep_heads, c.keep_channels)
        self.before = [(_full(s.param), _moments(s.param, optimizer, state.global_step > 0)) for s in self.slices]
        self.down = {i: _full(layer.mlp.down_proj.weight) for i, layer in decoder_layers(model).items()}
        self.step = {"rate": c.rate, "heads": {k: v.tolist() for k, v in c.keep_heads.items()},
                     "channels": {k: v.tolist() for k, v in c.keep_channels.items()},
                     "zero_grad": [], "open_between_micro_batches": [],
                     "moments_before_nonzero": any(bool(_omitted(v, s).ne(0).any())
                                                   for s, (_, m) in zip(self.slices, self.before) for v in m.values())}

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self.step["open_between_micro_batches"].append(_swapped(model))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for s in self.slices:
            if s.param.grad is not None:  # under DeepSpeed the engine has stepped and cleared them already
                self.step["zero_grad"].append(bool((_omitted(s.param.grad, s) == 0).all()))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        frozen = []
        for s, (weight, moments) in zip(self.slices, self.before):
            after = _moments(s.param, optimizer, stepped=True)
            frozen.append(torch.equal(_omitted(_full(s.param), s), _omitted(weight, s)))
            # a moment created by this step: zero gradients give zero moments
            frozen += [torch.equal(_omitted(after[k], s), _omitted(moments.get(k, torch.zeros_like(after[k])), s))
                       for k in after]
        moved = [(_full(layer.mlp.down_proj.weight) != self.down[i])[:, self.step["channels"].get(i, slice(None))]
                 for i, layer in decoder_layers(model).items()]
        self.step.update(frozen=frozen, kept_columns_moved=all(bool(m.any(0).all()) for m in moved),
                         dense_after_step=not _swapped(model))
        self.steps.append(self.step)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.eval_dense.append(not _swapped(model) and model.config.use_cache == args.use_cache)


def _check_steps(steps: list[dict], total: int) -> None:
    omitting = [s for s in steps if s["rate"] > 0]
    assert len(steps) == total and omitting
    for s in omitting:
        assert s["frozen"] and all(s["frozen"]), "an omitted weight or Adam moment moved in the optimizer step"
        assert s["kept_columns_moved"], "a kept down_proj column did not train"
        assert all(s["open_between_micro_batches"]), "the sliced forward was not in place for every micro-batch"
    assert all(s["dense_after_step"] for s in steps)
    # step 1 omits channels that step 0 trained (never-seen units rank first): their moments are nonzero
    assert steps[0]["channels"] != steps[1]["channels"] and steps[1]["moments_before_nonzero"]
    assert [s["rate"] for s in steps] == [LORS(total, 0.5, 0.5, 4).rate(i) for i in range(total)]


def test_sat_callback_omits_units_and_freezes_their_state(tmp_path):
    steps = 4
    model = _model()
    sat = SATCallback(SATConfig(omission_rate=0.5, stage1_fraction=0.5, rungs=4, optimizer_policy="freeze"))
    probe = Probe(sat)
    args = _args(str(tmp_path), steps, gradient_accumulation_steps=2, use_cpu=True, use_cache=True,
                 eval_strategy="steps", eval_steps=1)  # use_cache: off while heads are omitted, restored after
    trainer = Trainer(model=model, args=args, train_dataset=_data(16, 1), eval_dataset=_data(4, 2),
                      callbacks=[sat, probe])
    trainer.train()

    _check_steps(probe.steps, steps)
    assert all(s["zero_grad"] for s in probe.steps if s["rate"] > 0)
    assert sum(len(s["zero_grad"]) for s in probe.steps) > 20
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert [entry["sat_omission_rate"] for entry in logs] == [0.5, 0.5, 1 / 3, 0.0]
    # the first selection, step 1's never-seen channels, and the rate at each of the last two steps
    assert [entry["sat_selection_changes"] for entry in logs] == [1, 2, 3, 4]
    assert probe.eval_dense == [True] * steps, "evaluation during training did not run dense"
    assert not _swapped(model) and model.config.use_cache


def test_rate_zero_equals_plain_trainer(tmp_path):
    def run(callbacks):
        model = _model()
        Trainer(model=model, args=_args(str(tmp_path), 2, use_cpu=True), train_dataset=_data(4, 1),
                callbacks=callbacks).train()
        return model

    sat = SATCallback(SATConfig(omission_rate=0.0))
    plain, with_sat = run([]), run([sat])
    for (name, p), q in zip(plain.named_parameters(), with_sat.parameters()):
        assert torch.equal(p, q), name
    # LORS's rates never rise, so at rate 0 importance would never be read: none is recorded (engine.sat._dense)
    assert not any(seen.any() for seen in sat.controller.tracker.seen.values())
    assert sat.controller.selections == 0


def test_close_after_a_failed_step_restores_the_dense_model(tmp_path):
    class Fail(TrainerCallback):
        def on_optimizer_step(self, *args, **kwargs):
            raise RuntimeError("boom")

    model = _model()
    sat = SATCallback(SATConfig(omission_rate=0.5))
    trainer = Trainer(model=model, args=_args(str(tmp_path), 2, use_cpu=True, use_cache=True),
                      train_dataset=_data(4, 1), callbacks=[sat, Fail()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert _swapped(model) and not model.config.use_cache  # a callback does not see the exception
    sat.close()
    assert not _swapped(model) and model.config.use_cache


def _deepspeed_run(steps: int, stage: int, offload: bool) -> dict:
    import tempfile

    model = _model()
    sat = SATCallback(SATConfig(omission_rate=0.5, stage1_fraction=0.5, rungs=4, optimizer_policy="freeze"))
    probe = Probe(sat)
    with tempfile.TemporaryDirectory() as out:
        # use_cpu: without it accelerate finds no device backend and sizes the batch for 1 process
        args = _args(out, steps, gradient_accumulation_steps=2, deepspeed=_zero(stage, offload), use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=_data(32, 1), callbacks=[sat, probe])
        trainer.train()
    zero_optimizer = trainer.model_wrapped.optimizer
    return {"steps": probe.steps, "engine": type(trainer.model_wrapped).__name__,
            "offloaded": getattr(zero_optimizer, "cpu_offload", getattr(zero_optimizer, "offload_optimizer", False)),
            "logs": [entry for entry in trainer.state.log_history if "loss" in entry]}


@pytest.mark.distributed
@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (2, True)],
                         ids=["zero1", "zero2", "zero3", "zero2-offload"])
def test_sat_callback_under_deepspeed(stage, offload):
    """Under ZeRO-Offload the Trainer's own torch AdamW steps the host-memory state, with the callback's
    ``freeze`` guard on it (the engine's ZeRO optimizer asserted to offload)."""
    steps = 4
    ranks = run_ranks(_deepspeed_run, 2, steps, stage, offload)
    for r in ranks:
        assert r["engine"] == "DeepSpeedEngine" and r["offloaded"] == offload
        _check_steps(r["steps"], steps)
        assert all(math.isfinite(entry["loss"]) for entry in r["logs"])
        assert [entry["sat_omission_rate"] for entry in r["logs"]] == [s["rate"] for s in r["steps"]]
    selection = [[(s["heads"], s["channels"]) for s in r["steps"]] for r in ranks]
    assert selection[0] == selection[1], "ranks omitted different units (scores not averaged over DP)"

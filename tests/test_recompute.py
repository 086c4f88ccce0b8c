"""Activation recomputation, counted rather than assumed.

HF's activation (gradient) checkpointing of the decoder layers (``activation_checkpointing_enable``, the
new name of ``gradient_checkpointing_enable``; ``TrainingArguments(gradient_checkpointing=True)`` in a
``transformers.Trainer``) runs every decoder layer's forward again inside the backward. Hooks count the
runs of every decoder layer's forward: once per micro-batch without checkpointing, twice with it, which
is what makes a comparison with and without checkpointing a test of recomputation at all (a hook on the
layer module itself sees one call either way: HF checkpoints ``forward``, below the module's hooks). Under SAT the
recomputation re-runs the sliced forward and records importance a second time; what must hold:

- the recomputed step is the step: loss and every gradient equal bit for bit (float64, same kernels);
- the importance scores are not biased by the recomputation: every layer records twice as often, and
  the tracker's per-unit average makes the scores equal to the run without it, bit for bit;
- the weight slices are taken once per step, not again for the recomputation (``StepSlices.gathers``).

ds_accel's own trainer has no activation-checkpointing field of its own; under pipeline parallelism
DeepSpeed reads ``pipeline.activation_checkpoint_interval`` from the DeepSpeed config, and
tests/test_pipeline_train.py counts that recomputation in the pp=2 SAT run.
"""

from contextlib import nullcontext

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from ds_accel.config import SATConfig
from ds_accel.integrations import SATCallback
from ds_accel.sat import ImportanceTracker, decoder_layers, omit

LAYERS = 3
KEEP_HEADS = {0: torch.tensor([1, 2]), 2: torch.tensor([0, 3])}  # layer 1's heads stay dense (recorded by hook)
KEEP_CHANNELS = {1: torch.arange(0, 96, 3)}
CHECKPOINTING = [None, {"use_reentrant": False}, {"use_reentrant": True}]


def _model(dtype=torch.float64) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _count_forwards(model) -> list[int]:
    """Runs of each decoder layer's forward, counted by a pre-hook on its first module, the input RMSNorm.

    Not on the layer itself: HF checkpoints the layer's ``forward``, not its ``__call__``, so that the
    layer's own hooks (FSDP2's) run once; hooks on the modules its forward calls run at every recomputation.
    """
    counts = [0] * LAYERS
    for index, layer in decoder_layers(model).items():
        layer.input_layernorm.register_forward_pre_hook(lambda m, args, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


def _step(checkpointing: dict | None, sat: bool):
    """One forward + backward, optionally with checkpointing and under SAT's sliced step."""
    model = _model().train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(checkpointing)
    counts = _count_forwards(model)
    tracker = ImportanceTracker.for_model(model)
    records = {"heads": 0, "channels": 0}
    for kind, method in (("heads", tracker.record_heads), ("channels", tracker.record_channels)):
        def counted(*args, kind=kind, method=method, **kwargs):
            records[kind] += 1
            return method(*args, **kwargs)
        setattr(tracker, f"record_{kind}", counted)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with omit(model, KEEP_HEADS, KEEP_CHANNELS, tracker) if sat else nullcontext() as slices:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    tracker.update()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"forwards": counts, "records": records, "gathers": slices.gathers if sat else 0,
            "direct": slices.direct if sat else None, "loss": loss.detach(),
            "grads": grads, "scores": tracker.flat()}


@pytest.mark.parametrize("sat", [False, True], ids=["dense", "sat"])
def test_checkpointing_recomputes_every_layer_once_and_changes_nothing(sat):
    plain, *recomputed = (_step(c, sat) for c in CHECKPOINTING)
    assert plain["forwards"] == [1] * LAYERS
    if sat:
        assert plain["records"] == {"heads": LAYERS, "channels": LAYERS}
        assert plain["gathers"] == 4 * len(KEEP_HEADS) + 3 * len(KEEP_CHANNELS)  # q, k, v, o / gate, up, down
        # one use per weight: plain index_select; recomputed: the gather-once slices (so the two are compared)
        assert plain["direct"] and not any(run["direct"] for run in recomputed)
    for mode, run in zip(CHECKPOINTING[1:], recomputed):
        assert run["forwards"] == [2] * LAYERS, f"{mode}: not every decoder layer was recomputed once"
        assert torch.equal(run["loss"], plain["loss"])
        assert all(torch.equal(run["grads"][n], g) for n, g in plain["grads"].items()), mode
        if sat:
            assert run["records"] == {"heads": 2 * LAYERS, "channels": 2 * LAYERS}, "recomputation not recorded"
            assert torch.equal(run["scores"], plain["scores"]), f"{mode}: recomputation biased the importance"
            assert run["gathers"] == plain["gathers"], f"{mode}: weights sliced again for the recomputation"


def _trainer_run(tmp_path, checkpointing: bool):
    """2 optimizer steps of 2 micro-batches in a transformers.Trainer with SATCallback (rate 0.5)."""
    model = _model(torch.float32)
    counts = _count_forwards(model)
    tokens = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, gradient_checkpointing=checkpointing, report_to=[],
                             save_strategy="no", disable_tqdm=True, learning_rate=1e-2, seed=0)
    sat = SATCallback(SATConfig(omission_rate=0.5, stage1_fraction=1.0))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[sat]).train()
    return counts, sat.controller.tracker.flat(), {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sat_callback_under_trainer_gradient_checkpointing(tmp_path):
    """TrainingArguments(gradient_checkpointing=True): each layer runs twice per micro-batch, and the SAT run's
    trained weights are the ones without checkpointing, bit for bit, and so are its importance scores up to
    the order of the float32 sums: a step's statistic is the mean of 4 records (2 micro-batches, each
    recomputed) instead of 2, ((s1 + s1) + s2) + s2 against s1 + s2, a few units in the last place apart
    (asserted: 4 ulps relative, 2^-23 each); a recomputation that counted would double the score."""
    counts, scores, weights = _trainer_run(tmp_path, False)
    gc_counts, gc_scores, gc_weights = _trainer_run(tmp_path, True)
    assert counts == [4] * LAYERS and gc_counts == [8] * LAYERS  # 2 steps x 2 micro-batches, x2 recomputed
    torch.testing.assert_close(gc_scores, scores, rtol=4 * 2.0 ** -23, atol=0)
    assert all(torch.equal(gc_weights[n], w) for n, w in weights.items())

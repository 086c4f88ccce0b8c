"""SAT in a Hugging Face ``transformers.Trainer`` run, with or without ``--deepspeed``.

Usage (any Llama-architecture ``model``; the last LORS rung trains dense)::

    from transformers import Trainer, TrainingArguments

    from ds_accel.config import SATConfig
    from ds_accel.integrations import SATCallback

    args = TrainingArguments(output_dir="out", max_steps=10_000, weight_decay=0.1,
                             deepspeed="ds_config.json")  # optional; ZeRO 0-3
    sat = SATCallback(SATConfig(omission_rate=0.5, stage1_fraction=0.5, rungs=4))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[sat])
    trainer.train()  # the training logs carry sat_omission_rate

The Trainer builds its optimizer once over every parameter, so switching ``requires_grad`` per step
would change nothing: SAT acts on the computation (the sliced forward of :func:`ds_accel.sat.omit`) and
on the optimizer step (``SATConfig.optimizer_policy``), both through ``SATController``, the same per-step
logic as ds_accel's own trainer. Which Trainer events, and why:

* ``on_step_begin`` .. ``on_step_end`` enclose every micro-batch of one optimizer step, gradient
  accumulation included: selection at the start, one ``omit`` context over all forwards and backwards
  (gradient-checkpointing recomputations too; the weight slices are taken once for the step), the
  importance update at the end;
* the ``freeze`` policy hooks the step of the torch optimizer at the bottom of the Trainer's (under
  DeepSpeed, of its ZeRO optimizer), wherever the Trainer calls it: accelerate runs ``engine.step()``
  inside the last micro-batch's backward, before ``on_pre_optimizer_step``;
* evaluation, logging and checkpoints run after ``on_step_end``: on the dense model, HF's own forwards
  (the model builds no KV cache inside the ``omit`` context and gets its ``use_cache`` back after).

The HF model comes from the callbacks' ``model`` argument (the Trainer passes its unwrapped model; a
DeepSpeed engine or DDP wrapper would be looked through), the optimizer from ``optimizer`` (accelerate's
wrapper; under DeepSpeed its ``.optimizer`` is the ZeRO optimizer). ``cfg.enabled`` is not read: adding
the callback is what enables SAT. Not carried over a resume: the importance scores (they restart, and
the first steps visit every unit again); LORS continues from the resumed global step.

A training step that raises leaves its context open (a callback does not see exceptions); the next
``trainer.train()`` closes it, and :meth:`SATCallback.close` does it at once. ``sat_omission_rate`` and
``sat_selection_changes`` (selections so far that kept another set than the one before) are added in
``on_log``, so it reaches ``trainer.state.log_history``, the printed logs and the callbacks
after this one; report_to integrations see it when this callback runs first:
``trainer.callback_handler.callbacks.insert(0, sat)`` instead of ``callbacks=[sat]``.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ds_accel.config import SATConfig
from ds_accel.engine.sat import SATController


class SATCallback(TrainerCallback):
    """Sparsity-Accelerated Training with LORS for ``transformers.Trainer``; see the module docstring.

    ``controller`` (built at ``on_train_begin``) holds the step's selection: ``rate``, ``keep_heads``,
    ``keep_channels`` and the importance ``tracker``.
    """

    def __init__(self, cfg: SATConfig | None = None) -> None:
        self.cfg = cfg or SATConfig()
        self.controller: SATController | None = None
        self._attached = None  # the optimizer the policy hooks are on
        self._computation = ExitStack()  # the step's omit context: on_step_begin .. on_step_end
        self._slices = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        self.close()
        self.controller = SATController(self.cfg, model, state.max_steps, args.seed,
                                        micro_batches=args.gradient_accumulation_steps)
        self._attached = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      optimizer: Any = None, **kwargs: Any) -> None:
        self.close()
        sat = self.controller
        if optimizer is not self._attached:  # built after on_train_begin under DeepSpeed
            sat.attach(optimizer)
            self._attached = optimizer
        sat.begin_step(state.global_step)
        self._slices = self._computation.enter_context(sat.omitting())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._computation.close()
        self._slices = None
        self.controller.end_step()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Training logs only (they carry "loss"): evaluation runs dense."""
        if self.controller is not None and logs is not None and "loss" in logs:
            entry = {"sat_omission_rate": self.controller.rate,
                     "sat_selection_changes": self.controller.selection_changes}  # so far (SATController)
            logs.update(entry)
            state.log_history[-1].update(entry)  # Trainer.log's copy of logs

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave an unfinished step's context (HF's own forwards restored, its sliced gradients dropped)."""
        if self._slices is not None:
            self._slices.abandon()
            self._slices = None
        self._computation.close()
        if self.controller is not None and self.controller.guard is not None:
            self.controller.guard.disarm()


__all__ = ["SATCallback"]

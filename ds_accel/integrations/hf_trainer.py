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
on the optimizer step (omitted weights and moments written back), both through ``SATController``, the
same per-step logic as ds_accel's own trainer. Which Trainer events, and why:

* ``on_step_begin`` .. ``on_step_end`` enclose every micro-batch of one optimizer step, gradient
  accumulation included: selection at the start, the ``omit`` context over all forwards and backwards
  (gradient-checkpointing recomputations too), the importance update at the end;
* the omitted state is saved at ``on_step_begin`` and written back at ``on_optimizer_step``, not saved
  at ``on_pre_optimizer_step``: under DeepSpeed, accelerate runs ``engine.step()`` inside the last
  micro-batch's backward, before that event. Nothing writes weights or moments between the two points
  but the step itself, so the snapshot is the same with and without DeepSpeed;
* evaluation, logging and checkpoints run after ``on_step_end``: on the dense model, HF's own forwards.

The HF model comes from the callbacks' ``model`` argument (the Trainer passes its unwrapped model; a
DeepSpeed engine or DDP wrapper would be looked through), the optimizer from ``optimizer`` (accelerate's
wrapper; under DeepSpeed its ``.optimizer`` is the ZeRO optimizer). ``cfg.enabled`` is not read: adding
the callback is what enables SAT. Not carried over a resume: the importance scores (they restart, and
the first steps visit every unit again); LORS continues from the resumed global step.

A training step that raises leaves its contexts open (a callback does not see exceptions); the next
``trainer.train()`` closes them, and :meth:`SATCallback.close` does it at once. ``sat_omission_rate`` is
added in ``on_log``, so it reaches ``trainer.state.log_history``, the printed logs and the callbacks
after this one; report_to integrations see it when this callback runs first:
``trainer.callback_handler.callbacks.insert(0, sat)`` instead of ``callbacks=[sat]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from transformers import PretrainedConfig, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ds_accel.config import SATConfig
from ds_accel.engine.sat import SATController


@contextmanager
def _without_kv_cache(config: PretrainedConfig) -> Iterator[None]:
    """With ``TrainingArguments(use_cache=True)`` HF models build a KV cache in training; omitted heads
    cannot fill one."""
    previous = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = previous


class SATCallback(TrainerCallback):
    """Sparsity-Accelerated Training with LORS for ``transformers.Trainer``; see the module docstring.

    ``controller`` (built at ``on_train_begin``) holds the step's selection: ``rate``, ``keep_heads``,
    ``keep_channels`` and the importance ``tracker``.
    """

    def __init__(self, cfg: SATConfig | None = None) -> None:
        self.cfg = cfg or SATConfig()
        self.controller: SATController | None = None
        self._computation = ExitStack()  # omit (and no KV cache): on_step_begin .. on_step_end
        self._optimizer_guard = ExitStack()  # omitted weights and moments: on_step_begin .. on_optimizer_step

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        self.close()
        self.controller = SATController(self.cfg, model, state.max_steps, args.seed)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      optimizer: Any = None, **kwargs: Any) -> None:
        self.close()
        sat = self.controller
        sat.begin_step(state.global_step)
        if sat.keep_heads:
            self._computation.enter_context(_without_kv_cache(next(iter(sat.layers.values())).self_attn.config))
        self._computation.enter_context(sat.omitting())
        # frozen_omitted reads ``.optimizer``: accelerate's wrapper has it, as a DeepSpeed engine does
        self._optimizer_guard.enter_context(sat.guard_optimizer(optimizer))

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        self._optimizer_guard.close()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.close()
        self.controller.end_step()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Training logs only (they carry "loss"): evaluation runs dense."""
        if self.controller is not None and logs is not None and "loss" in logs:
            logs["sat_omission_rate"] = self.controller.rate
            state.log_history[-1]["sat_omission_rate"] = self.controller.rate  # Trainer.log's copy of logs

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave the step's contexts: omitted state written back, HF's own forwards restored."""
        self._optimizer_guard.close()
        self._computation.close()


__all__ = ["SATCallback"]

"""The QAT schedule as a Lightning callback, the final-step checkpoint, and the
stream-position hook for resume."""

from __future__ import annotations

from typing import Any

import lightning as L

from qat.quant import quantizers
from qat.quant.calibrate import apply_schedule


class FinalCheckpoint(L.Callback):
    """Writes `last.ckpt` at the final step when the step-based `ModelCheckpoint` did not
    (max_steps not a multiple of `every_n_train_steps`): otherwise it would hold an earlier
    step than the model the run evaluates, exports, resumes or distils from. Runs on every
    rank, inside the training processes, as Lightning's own saves do."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        if cb is None or not cb.save_last or cb.dirpath is None or trainer.global_step == 0:
            return
        if getattr(cb, "_last_global_step_saved", None) == trainer.global_step:
            return
        trainer.save_checkpoint(f"{cb.dirpath}/{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")


class QATScheduleCallback(L.Callback):
    """Applies the recipe's schedule at every optimizer step and logs quantizer health.

    The state is a function of `trainer.global_step` alone, so a resumed run lands in the same
    phase as an uninterrupted one. Every `log_every_n_steps` it logs, per quantizer, the share
    of clipped elements (`quant/<name>/clip`) and the mean scale (`quant/<name>/scale`).
    `weight_observers=False` (a GPTQ start) leaves weight scales to GPTQ and the optimizer.
    """

    def __init__(
        self, steps: dict[str, int | None], log_every_n_steps: int = 50,
        weight_observers: bool = True,
    ) -> None:
        self.steps = dict(steps)
        self.log_every_n_steps = log_every_n_steps
        self.weight_observers = weight_observers

    def _logging_now(self, trainer: L.Trainer) -> bool:
        n = self.log_every_n_steps
        return n > 0 and trainer.global_step % n == 0 and bool(trainer.loggers)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        apply_schedule(pl_module.model, trainer.global_step, self.steps, self.weight_observers)
        track = self._logging_now(trainer)
        for q in quantizers(pl_module.model).values():
            q.track_stats = track

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not any(q.track_stats for q in quantizers(pl_module.model).values()):
            return
        metrics = {}
        for name, q in quantizers(pl_module.model).items():
            q.track_stats = False
            if q.last_clip_fraction is not None:
                metrics[f"quant/{name}/clip"] = q.last_clip_fraction
            if q.observer is not None:
                s, _ = q.qparams()
                metrics[f"quant/{name}/scale"] = float(s.detach().float().mean())
        # Straight to the loggers at the step that was measured (Lightning's own flush cadence
        # would drop steps that are not multiples of trainer.log_every_n_steps).
        if metrics and trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step - 1)

"""Fit a training run into a wall-clock budget: as many epochs as the machine's measured speed allows.

Machines differ: in one process the same recipe took ~28 s an epoch on one 2-core cloud machine (AMD EPYC) and
~48 s on another (Intel Xeon; docs/recipe.md). A fixed epoch count is either too long for the slow one or wastes
the fast one's budget. After the first epoch, :class:`TimeBudget` knows what an epoch (training and validation)
costs here and how long the process has run (inventory, split and cache included), plans the number of epochs that
still fit, and makes the learning-rate schedule end exactly there, so the last epochs still anneal. The plan is
made once, stored in checkpoints (a resumed run keeps it) and logged as ``budget/planned_epochs``.
"""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl

from crackclf import PROCESS_STARTED
from crackclf.training.schedulers import set_total_steps

log = logging.getLogger(__name__)


class TimeBudget(pl.Callback):
    """Limit a run to ``minutes`` of wall time from the start of the process.

    Args:
        minutes: the whole run's budget (data preparation, training, testing and logging); ``None`` disables it.
        reserve_seconds: time kept for what follows training when planning (threshold pass, test, plots, MLflow
            artifacts); three validation passes are added to it, as measured in the first epoch (re-validation,
            the unaugmented training sample of the train–val gap, test).
    """

    def __init__(self, minutes: float | None, reserve_seconds: float = 3.0) -> None:
        if minutes is not None and minutes <= 0:
            raise ValueError(f"callbacks.time_budget.minutes={minutes} must be > 0 (or null to switch it off).")
        if reserve_seconds < 0:
            raise ValueError(f"callbacks.time_budget.reserve_seconds={reserve_seconds} must be >= 0.")
        self.minutes, self.reserve_seconds = minutes, reserve_seconds
        self.planned_epochs: int | None = None
        self._epoch_started = self._val_started = 0.0
        self._val_seconds = 0.0

    # A plan survives a resume: the resumed run keeps the epoch count (and so the schedule) it was given.
    def state_dict(self) -> dict:
        return {"planned_epochs": self.planned_epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned_epochs = state_dict.get("planned_epochs")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.minutes is not None and self.planned_epochs is not None:
            self._apply(trainer, self.planned_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_started = time.monotonic()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds = time.monotonic() - self._val_started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.minutes is None:
            return
        now = time.monotonic()
        epoch_seconds = now - self._epoch_started  # training + validation (validation runs inside the epoch)
        left = self.minutes * 60 - (now - PROCESS_STARTED) - self.reserve_seconds - 3 * self._val_seconds
        if self.planned_epochs is None:
            done = trainer.current_epoch + 1
            fit = done + max(0, math.floor(left / epoch_seconds)) if epoch_seconds > 0 else done
            cap = trainer.max_epochs
            planned = int(trainer.strategy.broadcast(max(done, min(cap, fit)), src=0))
            self._apply(trainer, planned)
            log.info("time budget %.2f min: an epoch takes %.1f s here, %.0f s are left -> %d epoch(s) in all "
                     "(trainer.max_epochs=%d)", self.minutes, epoch_seconds, left, planned, cap)
            pl_module.log("budget/planned_epochs", float(planned), sync_dist=True)
            return
        # Slower than planned (a busy machine): stop rather than overrun; the schedule is then cut short. Every rank
        # takes part in the broadcast, whatever its own clock says, and follows rank zero.
        behind = trainer.current_epoch + 1 < self.planned_epochs and left < epoch_seconds
        if trainer.strategy.broadcast(behind, src=0):
            log.warning("time budget: %.0f s left, an epoch takes %.1f s: stopping after epoch %d of %d planned",
                        left, epoch_seconds, trainer.current_epoch + 1, self.planned_epochs)
            trainer.should_stop = True

    def _apply(self, trainer: pl.Trainer, epochs: int) -> None:
        self.planned_epochs = epochs
        trainer.fit_loop.max_epochs = epochs
        steps = epochs * trainer.num_training_batches // max(1, trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and not set_total_steps(config.scheduler, steps):
                log.warning("time budget: %s cannot be re-planned; it keeps the schedule of trainer.max_epochs",
                            type(config.scheduler).__name__)

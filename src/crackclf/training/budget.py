"""Fit a training run into a wall-clock budget: as many epochs as the machine's measured speed allows.

Machines differ: the same recipe's epoch costs nearly twice as long on some 2-core cloud machines as on others
(`make bench-recipe`, docs/recipe.md). A fixed epoch count is either too long for the slow one or wastes the fast
one's budget. After the first epoch, :class:`TimeBudget` knows what an epoch (training and validation) costs here
and how long the process has run (inventory, split and cache included), plans the number of epochs that still fit
(decided at the end of the first epoch's validation pass), and makes the learning-rate schedule end exactly there, so
the last epochs still anneal. After each later epoch the plan only shrinks, when the machine has slowed down. It is
stored in checkpoints (a resumed run keeps it) and logged as ``budget/planned_epochs``."""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl

from crackclf import PROCESS_STARTED
from crackclf.errors import UsageError
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
            raise UsageError(f"callbacks.time_budget.minutes={minutes} must be > 0 (or null to switch it off).")
        if reserve_seconds < 0:
            raise UsageError(f"callbacks.time_budget.reserve_seconds={reserve_seconds} must be >= 0.")
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

    # DDP: every rank must agree on the plan, so rank zero's measurements are broadcast, and only here, at the end
    # of the epoch's validation pass: a point every rank reaches in the same order, when the epoch's training and
    # validation are both done and measured. Not at on_train_epoch_end, where rank zero's progress bar may still
    # be reducing the epoch's metrics while the other ranks' bars are off (a collective there pairs with a
    # different one and both ranks wait forever; crackclf/models/module.py).
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        now = time.monotonic()
        self._val_seconds = now - self._val_started
        if self.minutes is not None:
            left = self.minutes * 60 - (now - PROCESS_STARTED) - self.reserve_seconds - 3 * self._val_seconds
            self._decide(trainer, epoch_seconds=now - self._epoch_started, left=left)

    def _decide(self, trainer: pl.Trainer, epoch_seconds: float, left: float) -> None:
        """Plan (after the first epoch) or shorten the plan, from rank zero's clock; ``left``: seconds left for
        training after the reserve and 3 validation passes.

        Later epochs only ever shorten the plan (a busy machine, another process on the cores): the schedule then
        ends at the new last epoch, which still anneals, instead of stopping at a high learning rate; growing it
        would raise the learning rate again. Every rank takes part in the broadcast, whatever its own clock says,
        and follows rank zero."""
        done = trainer.current_epoch + 1
        first = self.planned_epochs is None
        fit = done + max(0, math.floor(left / epoch_seconds)) if epoch_seconds > 0 else done
        cap = trainer.max_epochs if first else self.planned_epochs
        planned = int(trainer.strategy.broadcast(max(done, min(cap, fit)), src=0))
        if first:
            log.info("time budget %.2f min: an epoch takes %.1f s here, %.0f s are left -> %d epoch(s) in all "
                     "(trainer.max_epochs=%d)", self.minutes, epoch_seconds, left, planned, trainer.max_epochs)
        elif planned < self.planned_epochs:
            log.warning("time budget: %.0f s left, an epoch takes %.1f s: %d epoch(s) in all instead of %d; the "
                        "schedule now ends there", left, epoch_seconds, planned, self.planned_epochs)
        else:
            return
        self._apply(trainer, planned)
        for logger in trainer.loggers:  # rank zero's loggers: the same value everywhere, nothing to reduce
            logger.log_metrics({"budget/planned_epochs": float(planned)}, step=trainer.global_step)

    def _apply(self, trainer: pl.Trainer, epochs: int) -> None:
        """Train ``epochs`` epochs in all (Lightning stops after the current one when it is the last) and end the
        step-wise schedule there."""
        self.planned_epochs = epochs
        trainer.fit_loop.max_epochs = epochs
        steps = epochs * trainer.num_training_batches // max(1, trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and not set_total_steps(config.scheduler, steps):
                log.warning("time budget: %s cannot be re-planned; it keeps the schedule of trainer.max_epochs",
                            type(config.scheduler).__name__)

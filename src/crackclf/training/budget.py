"""Fit a training run into a wall-clock budget: as many epochs as the machine's measured speed allows.

Machines differ: the same recipe's epoch costs nearly twice as long on some 2-core cloud machines as on others
(`make bench-recipe`, docs/recipe.md). A fixed epoch count is either too long for the slow one or wastes the fast
one's budget. After the first epoch, :class:`TimeBudget` knows what an epoch (training and validation) costs here
and how long the process has run (inventory, split and cache included), plans the training that still fits (decided
at the end of the first epoch's validation pass): whole epochs, and a last epoch cut to the batches that fit in the
time an epoch would not (the budget is spent on steps, not left over), and makes the learning-rate schedule end
exactly there, so the last steps still anneal. With ``plan_at`` < 1 the first plan is made earlier, after that
share of the first epoch's batches, from the measured step time, and fits the warm-up to the plan as well (a
machine that fits one epoch then warms up briefly and anneals within it); the first epoch's end corrects that plan
once, either way. After each later epoch the plan only shrinks, when the machine has slowed down. On a machine too
slow for even one epoch, the first epoch itself is cut: after ``guard_at`` of its batches the step time says how
many batches still fit, the epoch stops there (validated, checkpointed and tested as usual) and the schedule anneals
inside it. The plan is stored in checkpoints (a resumed run keeps it) and logged as ``budget/planned_epochs`` (and
``budget/last_epoch_batches`` when the last epoch is cut)."""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl

from crackclf import PROCESS_STARTED
from crackclf.errors import UsageError
from crackclf.training.schedulers import set_total_steps

log = logging.getLogger(__name__)


#: A validation batch costs a forward pass, a training step a forward and a (partial) backward pass and an optimiser
#: step: the share of a training step that a validation batch is guessed to cost, for the plans made inside the first
#: epoch only (its end re-plans from the measured validation pass). Somewhat above what the recipes' logs show
#: (docs/recipe.md, "Stop 22"), so an early plan errs on the short side.
VALIDATION_COST_GUESS = 0.4
#: A first epoch cut after ``guard_at`` of its batches (a few steps timed, so that the warm-up it still has to do is
#: short) is cut again, either way, after this share of them, from the steps timed by then.
GUARD_RECHECK_AT = 0.25
#: A last epoch cut to fewer than this share of an epoch's batches is not planned: its validation pass would cost
#: about as much as the steps gain, and the time is better kept as margin.
MIN_LAST_EPOCH_SHARE = 0.1


class TimeBudget(pl.Callback):
    """Limit a run to ``minutes`` of wall time from the start of the process.

    Args:
        minutes: the whole run's budget (data preparation, training, testing and logging); ``None`` disables it.
        reserve_seconds: time kept for what follows training when planning (threshold pass, test, plots, MLflow
            artifacts); three validation passes are added to it, as measured in the first epoch (re-validation,
            the unaugmented training sample of the train–val gap, test).
        plan_at: share of the first epoch's batches after which the first plan is made, from the step time measured
            over the later two thirds of them (the first steps carry one-off costs); 1.0 plans at the end of the
            first epoch's validation only. An epoch of fewer than 6 batches is planned at its end.
        guard_at: share of the first epoch's batches (at least 4 of them) after which the run checks, the same
            way, that the first epoch fits the budget at all; when it does not, the epoch is cut to the batches that
            fit, and the cut is corrected after :data:`GUARD_RECHECK_AT` of the epoch from more steps (1.0: never).
            Early, because a cut epoch has to warm up and anneal inside it: every step at the warm-up's low rate
            is one of few.
    """

    def __init__(self, minutes: float | None, reserve_seconds: float = 10.0, plan_at: float = 1.0,
                 guard_at: float = 0.02) -> None:
        if minutes is not None and minutes <= 0:
            raise UsageError(f"callbacks.time_budget.minutes={minutes} must be > 0 (or null to switch it off).")
        if reserve_seconds < 0:
            raise UsageError(f"callbacks.time_budget.reserve_seconds={reserve_seconds} must be >= 0.")
        if not 0.0 < plan_at <= 1.0:
            raise UsageError(f"callbacks.time_budget.plan_at={plan_at} must be in (0, 1]: the share of the first "
                             "epoch after which the run plans (1: at its end).")
        if not 0.0 < guard_at <= 1.0:
            raise UsageError(f"callbacks.time_budget.guard_at={guard_at} must be in (0, 1]: the share of the first "
                             "epoch after which the run checks that the epoch fits the budget (1: never).")
        self.minutes, self.reserve_seconds = minutes, reserve_seconds
        self.plan_at, self.guard_at = float(plan_at), float(guard_at)
        self.planned_epochs: int | None = None  # epochs in all, the last one maybe cut
        self.last_epoch_batches: int | None = None  # the last planned epoch's batches when it is cut to fit
        self._provisional = False  # the plan stands on a guessed epoch: the first epoch's end re-plans it
        self._max_epochs: int | None = None  # trainer.max_epochs as configured (a plan overwrites the trainer's)
        self._epoch_started = self._val_started = 0.0
        self._val_seconds = 0.0
        self._timing_from: tuple[int, float] | None = None  # (batch index, clock) where step timing started

    # A plan survives a resume: the resumed run keeps the epoch count (and so the schedule) it was given.
    def state_dict(self) -> dict:
        return {"planned_epochs": self.planned_epochs, "provisional": self._provisional,
                "max_epochs": self._max_epochs, "last_epoch_batches": self.last_epoch_batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned_epochs = state_dict.get("planned_epochs")
        # Checkpoints of stop 22 could only cut a first (and only) epoch, under the name first_epoch_batches.
        self.last_epoch_batches = state_dict.get("last_epoch_batches", state_dict.get("first_epoch_batches"))
        self._provisional = bool(state_dict.get("provisional", False))
        self._max_epochs = state_dict.get("max_epochs")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.minutes is not None and self.planned_epochs is not None:
            self._apply(trainer, self.planned_epochs, batches=self.last_epoch_batches)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.monotonic()
        self._timing_from = None

    def _early_batch(self, trainer: pl.Trainer, share: float) -> int | None:
        """The first epoch's batch after which to act at ``share`` of it, or ``None``: too short to time a step."""
        batches = trainer.num_training_batches
        if share >= 1.0 or not math.isfinite(batches) or batches < 6:
            return None
        return min(int(batches) - 1, max(3, round(share * batches)))

    # DDP: every rank must agree on the plan, so rank zero's measurements are broadcast, at points every rank reaches
    # in the same order: the end of the same training batch of the first epoch (every rank runs the same number of
    # batches; what the progress bar shows of a step was synchronised when it was logged) and the end of each
    # epoch's validation pass. Not at on_train_epoch_end, where rank zero's progress bar may still be reducing the
    # epoch's metrics while the other ranks' bars are off (a collective there pairs with a different one and both
    # ranks wait forever; crackclf/models/module.py).
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.minutes is None:
            return
        last = self.last_epoch_batches
        if last is not None and trainer.current_epoch == self.planned_epochs - 1 and batch_idx + 1 >= last:
            trainer.should_stop = True  # the same batch on every rank: the same decision
            return
        if trainer.current_epoch != 0:
            return
        # Inside the first epoch a cut can only be the guard's: the early plan (plan_at) plans whole epochs.
        cut = last if self.planned_epochs == 1 else None
        if self.planned_epochs is not None and cut is None:
            return
        guard, plan = self._early_batch(trainer, self.guard_at), self._early_batch(trainer, self.plan_at)
        recheck = self._early_batch(trainer, GUARD_RECHECK_AT) if guard is not None else None
        if recheck is not None and cut is not None:
            # A guard that timed a slow start (two steps) may have cut the epoch short of the re-check: re-check
            # before the cut's last batch, or the early guess would stand unmeasured.
            recheck = min(recheck, max(guard + 1, cut - 2))
        points = [b for b in (guard, recheck, plan) if b is not None]
        if not points:
            return
        if batch_idx == min(points) // 3:
            self._timing_from = (batch_idx, time.monotonic())
        if batch_idx not in points or self._timing_from is None:  # None: resumed past the start, plan at the end
            return
        now = time.monotonic()
        step = (now - self._timing_from[1]) / max(1, batch_idx - self._timing_from[0])
        batches = trainer.num_training_batches
        validation = step * VALIDATION_COST_GUESS * sum(trainer.num_val_batches)
        # For training batches from here on: the budget less the reserve, this epoch's validation and the 3 passes
        # that may follow training (re-validation, the training sample of the gap, test).
        left = self.minutes * 60 - (now - PROCESS_STARTED) - self.reserve_seconds - 4 * validation
        if batch_idx in (guard, recheck):
            # A cut epoch is the only one, and the best: its validation outputs are reused, no re-validation.
            for_training = left + validation
            fits = batch_idx + 1 + max(0, math.floor(for_training / step)) if step > 0 else batches
            fits = int(trainer.strategy.broadcast(min(fits, batches), src=0))
            if cut is None and fits < batches:
                self._cut_first_epoch(trainer, fits, batch_idx + 1, step * batches + validation, for_training)
                return
            if cut is not None:  # more steps timed: the cut moves, either way; the warm-up stays as it was fitted
                if fits != cut and trainer.is_global_zero:
                    log.info("time budget: timed over %d batches, the first epoch is cut to %d of its %d batches "
                             "instead of %d", batch_idx - self._timing_from[0], fits, batches, cut)
                self.last_epoch_batches = fits
                self._apply(trainer, 1, batches=fits)
                for logger in trainer.loggers:
                    logger.log_metrics({"budget/last_epoch_batches": float(fits),
                                        "budget/planned_epochs": fits / batches}, step=trainer.global_step)
                return
        if batch_idx == plan and self.planned_epochs is None:
            rest_of_epoch = step * (batches - batch_idx - 1)
            self._decide(trainer, epoch_seconds=step * batches + validation, left=left - rest_of_epoch,
                         validation_seconds=validation, provisional=True)

    def _cut_first_epoch(self, trainer: pl.Trainer, batches: int, timed: int, epoch_seconds: float,
                         left: float) -> None:
        """Not even one epoch fits: train ``batches`` of the first one, then validate, test and stop, with the
        warm-up and the annealing of the schedule fitted to those batches."""
        if trainer.is_global_zero:  # the other ranks follow rank zero's numbers: one message
            log.warning("time budget %.2f min: one epoch would take %.0f s here (estimated after %d batches) and "
                        "%.0f s are left for training: the first and only epoch is cut to %d of its %d batches; "
                        "the schedule ends there (more images: a larger callbacks.time_budget.minutes, or a cheaper "
                        "backbone such as experiment=cpu_scratch)", self.minutes, epoch_seconds, timed,
                        max(0.0, left), batches, trainer.num_training_batches)
        self.last_epoch_batches, self._max_epochs = batches, trainer.max_epochs
        self._apply(trainer, 1, fit_warmup=True, batches=batches)
        for logger in trainer.loggers:
            logger.log_metrics({"budget/planned_epochs": batches / trainer.num_training_batches,
                                "budget/last_epoch_batches": float(batches)}, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_started = time.monotonic()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        now = time.monotonic()
        self._val_seconds = now - self._val_started
        if self.minutes is not None:
            left = self.minutes * 60 - (now - PROCESS_STARTED) - self.reserve_seconds - 3 * self._val_seconds
            self._decide(trainer, epoch_seconds=now - self._epoch_started, left=left,
                         validation_seconds=self._val_seconds)

    def _decide(self, trainer: pl.Trainer, epoch_seconds: float, left: float, validation_seconds: float,
                provisional: bool = False) -> None:
        """Plan, re-plan a provisional plan, or shorten the plan, from rank zero's clock; ``left``: seconds left for
        training after the current epoch, the reserve and 3 validation passes.

        The plan is counted in training batches: the whole epochs that fit, then a last epoch cut to the batches
        that fit in what is left (with its own validation pass), when that is at least :data:`MIN_LAST_EPOCH_SHARE`
        of an epoch. A plan made early in the first epoch (``provisional``) stands on a guessed validation cost and
        plans whole epochs; the first epoch's end re-plans it from the measured epoch, in either direction, while
        the schedule is still near its top. Later epochs only ever shorten the plan (a busy machine, another process
        on the cores): the schedule then ends at the new last step, which still anneals, instead of stopping at a
        high learning rate; growing it would raise the learning rate again. Every rank takes part in the broadcast,
        whatever its own clock says, and follows rank zero."""
        done = trainer.current_epoch + 1
        per_epoch = trainer.num_training_batches
        per_epoch = int(per_epoch) if math.isfinite(per_epoch) and per_epoch > 0 else 1
        first, replan = self.planned_epochs is None, self._provisional and not provisional
        whole = max(0, math.floor(left / epoch_seconds)) if epoch_seconds > 0 else 0
        part = 0
        step = (epoch_seconds - validation_seconds) / per_epoch
        if not provisional and step > 0 and per_epoch > 1:
            part = max(0, math.floor((left - whole * epoch_seconds - validation_seconds) / step))
            part = min(part, per_epoch - 1) if part >= MIN_LAST_EPOCH_SHARE * per_epoch else 0
        fit = (done + whole) * per_epoch + part
        if first:
            self._max_epochs = trainer.max_epochs
        if first or replan:
            cap = (self._max_epochs or trainer.max_epochs) * per_epoch
        else:
            cap = self._planned_batches(per_epoch)
        # Never below what is trained by the end of this epoch (which may itself be a cut last one).
        floor = done * per_epoch if first or replan else min(done * per_epoch, cap)
        planned = int(trainer.strategy.broadcast(max(floor, min(cap, fit)), src=0))
        epochs = -(-planned // per_epoch)
        last = planned - (epochs - 1) * per_epoch
        last = last if last < per_epoch else None
        when = "early in the first epoch" if provisional else "after the first epoch"
        shown = f"{epochs} epoch(s) in all" + (f", the last cut to {last} of its {per_epoch} batches" if last else "")
        if first:
            log.info("time budget %.2f min: an epoch takes %.1f s here (%s), %.0f s are left -> %s "
                     "(trainer.max_epochs=%d)", self.minutes, epoch_seconds,
                     "estimated " + when if provisional else "measured", left, shown, trainer.max_epochs)
        elif replan and planned != self._planned_batches(per_epoch):
            log.info("time budget: the first epoch took %.1f s, %.0f s are left -> %s instead of the %d "
                     "epoch(s) planned early in it", epoch_seconds, left, shown, self.planned_epochs)
        elif planned < self._planned_batches(per_epoch):
            log.warning("time budget: %.0f s left, an epoch takes %.1f s: %s instead of %d batches; the "
                        "schedule now ends there", left, epoch_seconds, shown, self._planned_batches(per_epoch))
        else:
            self._provisional = self._provisional and provisional
            return
        self._provisional = provisional
        self.last_epoch_batches = last
        self._apply(trainer, epochs, fit_warmup=provisional, batches=last)
        metrics = {"budget/planned_epochs": planned / per_epoch}
        if last is not None:
            metrics["budget/last_epoch_batches"] = float(last)
        for logger in trainer.loggers:  # rank zero's loggers: the same value everywhere, nothing to reduce
            logger.log_metrics(metrics, step=trainer.global_step)

    def _planned_batches(self, per_epoch: int) -> int:
        """The training batches of the current plan."""
        last = self.last_epoch_batches if self.last_epoch_batches is not None else per_epoch
        return (self.planned_epochs - 1) * per_epoch + last

    def _apply(self, trainer: pl.Trainer, epochs: int, fit_warmup: bool = False, batches: int | None = None) -> None:
        """Train ``epochs`` epochs in all (Lightning stops after the current one when it is the last) and end the
        step-wise schedule there; with ``fit_warmup`` (the first plan, made during the warm-up) the warm-up becomes
        its configured share of the planned steps. ``batches``: the last epoch's batches when it is cut. A resumed
        run restores its warm-up from the checkpoint."""
        self.planned_epochs = epochs
        trainer.fit_loop.max_epochs = epochs
        if batches is not None:  # trainer.min_epochs (1 in conf/trainer) would override the stop inside the epoch
            trainer.fit_loop.min_epochs = 0
        per_epoch = trainer.num_training_batches
        if not math.isfinite(per_epoch):  # an iterable of unknown length: nothing to count steps with
            return
        steps = (epochs - 1) * int(per_epoch) + (batches if batches is not None else int(per_epoch))
        steps //= max(1, trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            taken = trainer.global_step if fit_warmup else None
            if config.interval == "step" and not set_total_steps(config.scheduler, steps, warmup_from=taken):
                log.warning("time budget: %s cannot be re-planned; it keeps the schedule of trainer.max_epochs",
                            type(config.scheduler).__name__)

"""The wall-time budget: after the first epoch a run plans the epochs that fit, and the cosine schedule ends there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

import crackclf.training.budget as budget_module
from crackclf.training.budget import TimeBudget
from crackclf.training.schedulers import WarmupCosineFactor, set_total_steps, warmup_cosine
from tests.conftest import tiny_fit


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(tiny_dataset, tmp_path, budget: TimeBudget, max_epochs: int) -> tuple[pl.Trainer, _RecordLR]:
    recorder = _RecordLR()
    _, trainer = tiny_fit(tiny_dataset, tmp_path, [budget, recorder], max_epochs,
                          scheduler=lambda optimizer, total_steps: warmup_cosine(optimizer, total_steps, 0.05))
    return trainer, recorder


def test_a_spent_budget_stops_after_the_first_epoch(tiny_dataset, tmp_path):
    budget = TimeBudget(minutes=1e-4, reserve_seconds=0)  # already over when the first epoch ends
    trainer, _ = _fit(tiny_dataset, tmp_path, budget, max_epochs=6)
    assert budget.planned_epochs == 1 and trainer.current_epoch == 1  # one epoch trained, not six
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == trainer.num_training_batches


def test_plan_from_the_measured_epoch_and_schedule_ending_there(tiny_dataset, tmp_path, monkeypatch):
    # A clock that advances 10 s at every reading: an epoch (start, validation start, validation end: where the
    # budget decides) takes 20 s, of which validation 10 s; the process "started" at 0. After epoch 0 (t=30 s) an
    # 80 s budget leaves 80 - 30 - 3 x 10 = 20 s: one more 20 s epoch fits, so 2 epochs in all, not max_epochs=6.
    ticks = iter(range(10, 10_000, 10))
    monkeypatch.setattr(budget_module, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    budget = TimeBudget(minutes=80 / 60, reserve_seconds=0)
    trainer, recorder = _fit(tiny_dataset, tmp_path, budget, max_epochs=6)
    assert budget.planned_epochs == 2 and trainer.current_epoch == 2
    steps = 2 * trainer.num_training_batches
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.lr_lambdas[0].total_steps == steps
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 0.01)  # annealed to its floor at the new end
    assert len(recorder.rates) == steps and recorder.rates[-1] < recorder.rates[len(recorder.rates) // 2]


def test_a_run_slower_than_planned_shortens_the_plan_and_still_anneals(tiny_dataset, tmp_path, monkeypatch):
    ticks = iter(range(10, 10_000, 10))
    monkeypatch.setattr(budget_module, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    budget = TimeBudget(minutes=100 / 60, reserve_seconds=0)
    budget.planned_epochs = 5  # as if planned on a faster machine (a resumed run keeps its plan)
    trainer, recorder = _fit(tiny_dataset, tmp_path, budget, max_epochs=6)
    # t=30: 100 - 30 - 30 = 40 s left: 2 more 20 s epochs fit, 3 in all instead of 5, and the schedule ends at 3;
    # t=60: 10 s left, nothing more fits: 2 in all, stop after this one.
    assert budget.planned_epochs == 2 and trainer.current_epoch == 2
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 2 * trainer.num_training_batches
    # Epoch 1 followed the shorter schedule: its last step's rate is well below the 5-epoch schedule's there.
    five_epochs = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2),
                                5 * trainer.num_training_batches, 0.05).lr_lambdas[0]
    last_step = len(recorder.rates) - 1
    assert recorder.rates[-1] < 0.8 * 1e-2 * five_epochs(last_step)


def test_an_ample_budget_keeps_max_epochs_and_the_planned_schedule(tiny_dataset, tmp_path):
    budget = TimeBudget(minutes=60)
    trainer, recorder = _fit(tiny_dataset, tmp_path, budget, max_epochs=3)
    assert budget.planned_epochs == 3 and trainer.current_epoch == 3
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 3 * trainer.num_training_batches
    assert budget.state_dict() == {"planned_epochs": 3, "provisional": False, "max_epochs": 3,
                                   "last_epoch_batches": None}


def test_no_budget_changes_nothing(tiny_dataset, tmp_path):
    budget = TimeBudget(minutes=None)
    trainer, _ = _fit(tiny_dataset, tmp_path, budget, max_epochs=2)
    assert budget.planned_epochs is None and trainer.current_epoch == 2


def test_replanned_cosine_reaches_its_floor_at_the_new_end():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=1000, warmup_fraction=0.05, min_lr_ratio=0.01)
    factor: WarmupCosineFactor = scheduler.lr_lambdas[0]
    assert set_total_steps(scheduler, 300)
    assert factor(49) == pytest.approx(1.0) and factor(300) == pytest.approx(0.01)
    assert factor(175) == pytest.approx(0.505, abs=0.01)  # halfway through the decay
    assert not set_total_steps(torch.optim.lr_scheduler.StepLR(optimizer, 10), 300)


@pytest.mark.parametrize(("minutes", "reserve", "message"), [(0, 10, "must be > 0"), (5, -1, "must be >= 0")])
def test_bad_settings_are_named(minutes, reserve, message):
    with pytest.raises(ValueError, match=message):
        TimeBudget(minutes=minutes, reserve_seconds=reserve)


class _Clock:
    """A monotonic clock that returns ``readings`` in turn, then keeps advancing by one second per reading."""

    def __init__(self, readings: list[float]) -> None:
        self.readings, self.last = list(readings), 0.0

    def monotonic(self) -> float:
        self.last = self.readings.pop(0) if self.readings else self.last + 1.0
        return self.last


class _RecordPlan(pl.Callback):
    """Which training batch of which epoch first saw a plan, and the warm-up and total steps it set."""

    def __init__(self, budget: TimeBudget) -> None:
        self.budget, self.first_planned_at = budget, None
        self.schedule: tuple[int, int] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.budget.planned_epochs is not None and self.first_planned_at is None:
            self.first_planned_at = (trainer.current_epoch, batch_idx)
            if trainer.lr_scheduler_configs:
                factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
                self.schedule = (factor.warmup_steps, factor.total_steps)


def _fit_early(tiny_dataset, tmp_path, budget: TimeBudget, max_epochs: int, warmup_fraction: float = 0.5,
               extra: tuple = ()):
    plan, rates = _RecordPlan(budget), _RecordLR()
    _, trainer = tiny_fit(tiny_dataset, tmp_path, [*extra, budget, plan, rates], max_epochs, batch_size=4,
                          scheduler=lambda optimizer, total_steps: warmup_cosine(optimizer, total_steps,
                                                                                 warmup_fraction))
    return trainer, plan, rates


def test_the_first_plan_is_made_early_in_the_first_epoch_and_fits_the_warmup(tiny_dataset, tmp_path, monkeypatch):
    # The clock's readings, in the order the budget takes them: epoch 0 starts at 10 s; the step timing runs from
    # the end of batch 2 (20 s) to the end of batch 7 (30 s): 2 s a step. Batches 8-13 and a validation pass of
    # 3 batches (guessed at 0.7 of a step each: 4.2 s) are left of epoch 0: 16.2 s. An epoch is guessed at
    # 14 x 2 + 4.2 = 32.2 s. A 120 s budget leaves 120 - 30 - 3 x 4.2 - 16.2 = 61.2 s: one more epoch, 2 in all.
    # At epoch 0's end (validation 40-50 s, the epoch 40 s) 120 - 50 - 30 = 40 s fit one more 40 s epoch: 2 stays.
    clock = _Clock([10, 20, 30, 40, 50])
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    monkeypatch.setattr(budget_module, "VALIDATION_COST_GUESS", 0.7)
    budget = TimeBudget(minutes=2, reserve_seconds=0, plan_at=0.5, guard_at=1.0)  # the plan alone reads the clock
    trainer, plan, rates = _fit_early(tiny_dataset, tmp_path, budget, max_epochs=6)
    batches = trainer.num_training_batches
    assert batches == 14 and sum(trainer.num_val_batches) == 3  # what the arithmetic above stands on
    assert plan.first_planned_at == (0, 7)  # planned half-way through the first epoch, not at its end
    assert budget.planned_epochs == 2 and trainer.current_epoch == 2 and not budget._provisional
    # The warm-up, sized for 6 epochs (42 steps), became half of the 28 planned steps: 14, not past the end.
    assert plan.schedule == (14, 28)
    assert rates.rates[13] == pytest.approx(1e-2) and rates.rates[-1] < 0.1 * 1e-2  # warmed up, then annealed


def test_an_early_plan_is_corrected_once_by_the_measured_first_epoch(tiny_dataset, tmp_path, monkeypatch):
    # As above, the early guess is 2 epochs (61.2 s left, 32.2 s an epoch). The first epoch really took 20 s
    # (validation 28-30 s) and 120 - 30 - 3 x 2 = 84 s are left: 4 more epochs fit, 5 in all; the schedule grows to
    # 5 epochs' steps with the warm-up it already had.
    clock = _Clock([10, 20, 30, 28, 30] + [30 + k for k in range(1, 200)])
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    monkeypatch.setattr(budget_module, "VALIDATION_COST_GUESS", 0.7)
    budget = TimeBudget(minutes=2, reserve_seconds=0, plan_at=0.5, guard_at=1.0)  # the plan alone reads the clock
    trainer, plan, _ = _fit_early(tiny_dataset, tmp_path, budget, max_epochs=6)
    assert plan.first_planned_at == (0, 7) and plan.schedule == (14, 28)
    assert budget.planned_epochs == 5 and trainer.current_epoch == 5
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert (factor.warmup_steps, factor.total_steps) == (14, 5 * 14)


def test_a_short_first_epoch_is_planned_at_its_end(tiny_dataset, tmp_path):
    budget = TimeBudget(minutes=60, plan_at=0.5)  # 4 batches of 16: too few to time a step early
    plan = _RecordPlan(budget)
    _, trainer = tiny_fit(tiny_dataset, tmp_path, [budget, plan], 2)
    assert trainer.num_training_batches < 6 and plan.first_planned_at == (1, 0)  # first seen in epoch 1
    assert budget.planned_epochs == 2


def test_warmup_fitted_to_a_plan_never_jumps_past_the_steps_taken_nor_grows():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=1000, warmup_fraction=0.1)  # warm-up 100 steps
    factor: WarmupCosineFactor = scheduler.lr_lambdas[0]
    assert set_total_steps(scheduler, 200, warmup_from=30) and (factor.warmup_steps, factor.total_steps) == (31, 200)
    assert set_total_steps(scheduler, 600, warmup_from=10) and factor.warmup_steps == 31  # never longer
    set_total_steps(scheduler, 100)
    assert factor.warmup_steps == 31 and factor.total_steps == 100  # without warmup_from the warm-up stays
    old = WarmupCosineFactor(1000, 100, 0.01)  # as restored from a checkpoint written before warmup_fraction
    del old.warmup_fraction
    scheduler.lr_lambdas[0] = old
    assert set_total_steps(scheduler, 200, warmup_from=30) and old.warmup_steps == 100


def test_plan_at_must_be_a_share_of_the_epoch():
    with pytest.raises(ValueError, match=r"plan_at=0 must be in \(0, 1\]"):
        TimeBudget(minutes=5, plan_at=0)


class _MinEpochs(pl.Callback):
    """``trainer.min_epochs`` as conf/trainer/default.yaml sets it (tiny_fit's trainer leaves it unset)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.fit_loop.min_epochs = 1


def test_a_first_epoch_that_cannot_fit_is_cut_validated_and_annealed(tiny_dataset, tmp_path, monkeypatch):
    # 14 batches an epoch; the guard acts after round(0.25 x 14) = 4 (index 4), timed from index 1: the epoch starts
    # at 10 s, batch 1 ends at 20 s and batch 4 at 26 s: 2 s a step. A validation pass is guessed at 3 x 0.7 x 2 =
    # 4.2 s; this epoch's and the 2 after a cut epoch (no re-validation) leave 55 - 26 - 3 x 4.2 = 16.4 s: 8 more
    # batches, 13 of the 14.
    clock = _Clock([10, 20, 26])
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    monkeypatch.setattr(budget_module, "VALIDATION_COST_GUESS", 0.7)
    budget = TimeBudget(minutes=55 / 60, reserve_seconds=0, guard_at=0.25)  # the check and its re-check at once
    trainer, _, rates = _fit_early(tiny_dataset, tmp_path, budget, max_epochs=6, extra=[_MinEpochs()])
    assert trainer.num_training_batches == 14 and sum(trainer.num_val_batches) == 3
    assert budget.last_epoch_batches == 13 and budget.planned_epochs == 1
    assert trainer.global_step == 13
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert factor.total_steps == 13 and 5 <= factor.warmup_steps < 13  # warm-up and annealing inside the 13 steps
    assert len(rates.rates) == 13 and rates.rates[-1] < 0.1 * 1e-2  # annealed by the cut epoch's last step
    assert "val/loss" in trainer.callback_metrics  # the cut epoch was validated (checkpoint, threshold, test)
    assert budget.state_dict()["last_epoch_batches"] == 13  # a resumed run stops at the same batch


def test_an_early_cut_is_corrected_by_the_steps_timed_until_the_recheck(tiny_dataset, tmp_path, monkeypatch):
    # The guard acts after batch 3 (its minimum), the re-check after round(0.25 x 14) = 4, both timed from batch 1
    # (20 s). At batch 3 (30 s): 5 s a step, validation guessed at 3 x 0.7 x 5 = 10.5 s: 90 - 30 - 3 x 10.5 = 28.5 s
    # fit 5 more batches: cut to 9. At batch 4 (32 s): 4 s a step, 8.4 s a validation: 90 - 32 - 25.2 = 32.8 s fit 8
    # more: the cut moves to 13. The warm-up was fitted at the first cut and stays.
    clock = _Clock([10, 20, 30, 32])
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    monkeypatch.setattr(budget_module, "VALIDATION_COST_GUESS", 0.7)
    budget = TimeBudget(minutes=90 / 60, reserve_seconds=0, guard_at=0.2)
    trainer, plan, rates = _fit_early(tiny_dataset, tmp_path, budget, max_epochs=6, extra=[_MinEpochs()])
    assert plan.first_planned_at == (0, 3) and plan.schedule[1] == 9  # the first cut, at the guard
    assert budget.last_epoch_batches == 13 and trainer.global_step == 13
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert factor.total_steps == 13 and factor.warmup_steps == plan.schedule[0] <= 5
    assert rates.rates[-1] < 0.1 * 1e-2


def test_a_cut_short_of_the_recheck_is_rechecked_before_it_ends(tiny_dataset, tmp_path, monkeypatch):
    # Seen on a real run: two slow first steps made the guard cut the epoch to 26 batches, before its re-check at a
    # quarter of it, so the cut stood on two steps' timing. Here the re-check would come after batch 8 (0.6 x 14),
    # the guard after batch 3 (timed from batch 1, 20 s): 10 s a step at 40 s, validation guessed at 3 x 0.7 x 10 =
    # 21 s: 135 - 40 - 3 x 21 = 32 s fit 3 more batches: cut to 7. The re-check then comes after batch 5 (the cut's
    # last batch but one): at 44 s, 6 s a step, 12.6 s a validation: 135 - 44 - 37.8 = 53.2 s fit 8 more: all 14.
    clock = _Clock([10, 20, 40, 44])
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    monkeypatch.setattr(budget_module, "VALIDATION_COST_GUESS", 0.7)
    monkeypatch.setattr(budget_module, "GUARD_RECHECK_AT", 0.6)
    budget = TimeBudget(minutes=135 / 60, reserve_seconds=0, guard_at=0.2)
    trainer, plan, _ = _fit_early(tiny_dataset, tmp_path, budget, max_epochs=6, extra=[_MinEpochs()])
    assert plan.first_planned_at == (0, 3) and plan.schedule[1] == 7  # the guard's cut
    assert budget.last_epoch_batches == 14 and trainer.global_step == 14  # moved by the re-check, not left at 7


def test_a_first_epoch_that_fits_is_not_cut(tiny_dataset, tmp_path, monkeypatch):
    clock = _Clock([10, 20, 26])  # as above, 2 s a step, with a budget of 10 minutes: the epoch fits
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    budget = TimeBudget(minutes=10, reserve_seconds=0)
    trainer, plan, _ = _fit_early(tiny_dataset, tmp_path, budget, max_epochs=2)
    assert budget.last_epoch_batches is None and trainer.global_step == 2 * 14
    assert plan.first_planned_at == (1, 0)  # planned at the first epoch's end, as without the guard


def test_guard_at_must_be_a_share_of_the_epoch():
    with pytest.raises(ValueError, match=r"guard_at=1.5 must be in \(0, 1\]"):
        TimeBudget(minutes=5, guard_at=1.5)


def test_the_time_an_epoch_does_not_fit_in_goes_to_a_cut_last_epoch(tiny_dataset, tmp_path, monkeypatch, caplog):
    # Epoch 0 runs from 10 s to 30 s (validation 20-30 s): 10 s for its 3 batches, 3.3 s a step. A 97 s budget
    # leaves 97 - 30 - 3 x 10 = 37 s: one more 20 s epoch, then 17 s of which 10 s are the cut epoch's validation
    # pass: 7 s, 2 more batches. Epoch 1 (30-50 s) confirms it: 97 - 50 - 30 = 17 s, 2 batches.
    clock = _Clock([10, 20, 30, 30, 40, 50, 50])
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(budget_module, "PROCESS_STARTED", 0.0)
    budget = TimeBudget(minutes=97 / 60, reserve_seconds=0)
    caplog.set_level("INFO", logger="crackclf.training.budget")
    trainer, recorder = _fit(tiny_dataset, tmp_path, budget, max_epochs=6)
    assert "-> 3 epoch(s) in all, the last cut to 2 of its 3 batches" in caplog.text  # what the user reads
    per_epoch = trainer.num_training_batches
    assert per_epoch == 3  # what the arithmetic above stands on
    assert budget.planned_epochs == 3 and budget.last_epoch_batches == 2
    assert trainer.global_step == 2 * per_epoch + 2 and len(recorder.rates) == 2 * per_epoch + 2
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 2 * per_epoch + 2
    assert recorder.rates[-1] < 0.2 * recorder.rates[per_epoch]  # annealed by the cut epoch's last step
    assert "val/loss" in trainer.callback_metrics and budget.state_dict()["last_epoch_batches"] == 2


def test_a_checkpoint_of_a_cut_first_epoch_from_before_the_rename_keeps_its_cut():
    budget = TimeBudget(minutes=5)
    budget.load_state_dict({"planned_epochs": 1, "provisional": False, "max_epochs": 20, "first_epoch_batches": 84})
    assert budget.planned_epochs == 1 and budget.last_epoch_batches == 84

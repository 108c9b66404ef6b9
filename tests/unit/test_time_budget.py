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
    assert budget.state_dict() == {"planned_epochs": 3}


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

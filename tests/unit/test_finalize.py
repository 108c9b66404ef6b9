"""The stage after fitting: the deployed weights' validation scores, threshold and test, from a real tiny fit."""

from __future__ import annotations

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint

import crackclf.training.finalize as finalize_module
from crackclf.training.finalize import finalize
from tests.conftest import tiny_fit


def _counting_validate(trainer, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = trainer.validate

    def validate(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", validate)
    return calls


def test_the_last_epochs_validation_scores_the_best_weights_without_a_second_pass(tiny_dataset, tmp_path,
                                                                                 monkeypatch):
    # monitor=None: the checkpoint always holds the latest epoch, so the best weights are the last epoch's.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor=None)
    datamodule, trainer = tiny_fit(tiny_dataset, tmp_path, [checkpoint], 2)
    model = trainer.lightning_module
    calls = _counting_validate(trainer, monkeypatch)
    reused = finalize(trainer, model, datamodule, threshold_mode="f1", target_recall=0.99, max_gap=0.05)
    assert calls == []  # no second validation pass

    monkeypatch.setattr(finalize_module, "_last_validation", lambda *args: None)  # force the second pass
    again = finalize(trainer, model, datamodule, threshold_mode="f1", target_recall=0.99, max_gap=0.05)
    assert calls == [1]
    assert reused.val_acc == pytest.approx(again.val_acc, abs=1e-9)
    assert reused.val_loss == pytest.approx(again.val_loss, abs=1e-6)
    assert reused.threshold == pytest.approx(again.threshold, abs=1e-9)
    assert reused.test == pytest.approx(again.test, abs=1e-6) and "test/acc" in reused.test


def test_best_weights_from_an_earlier_epoch_are_validated_again(tiny_dataset, tmp_path, monkeypatch):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor=None)
    datamodule, trainer = tiny_fit(tiny_dataset, tmp_path, [checkpoint], 2)
    model = trainer.lightning_module
    model.val_outputs_epoch = 0  # as if the last validation pass had scored other weights than the checkpoint's
    calls = _counting_validate(trainer, monkeypatch)
    report = finalize(trainer, model, datamodule, threshold_mode="f1", target_recall=0.99, max_gap=0.05)
    assert calls == [1] and 0.0 <= report.val_acc <= 1.0

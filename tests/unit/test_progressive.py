"""Progressive resizing: early epochs train on smaller images, later ones (and every validation) at full size."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from crackclf.training.progressive import ProgressiveResize
from tests.conftest import tiny_fit


class _RecordSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: dict[tuple[str, int], set[int]] = {}

    def _record(self, stage: str, trainer: pl.Trainer, batch) -> None:
        self.sizes.setdefault((stage, trainer.current_epoch), set()).add(batch[0].shape[-1])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record("train", trainer, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("val", trainer, batch)


def _fit(tiny_dataset, tmp_path, resize: ProgressiveResize, epochs: int, image_size: int = 48) -> _RecordSizes:
    recorder = _RecordSizes()
    tiny_fit(tiny_dataset, tmp_path, [resize, recorder], epochs, image_size=image_size, lr=1e-3)
    return recorder


def test_first_epochs_train_small_then_full_size_and_validation_always_full(tiny_dataset, tmp_path):
    recorder = _fit(tiny_dataset, tmp_path, ProgressiveResize(size=32, epochs=2), epochs=3)
    assert recorder.sizes[("train", 0)] == recorder.sizes[("train", 1)] == {32}
    assert recorder.sizes[("train", 2)] == {48}
    assert all(recorder.sizes[("val", epoch)] == {48} for epoch in range(3))


def test_size_not_below_image_size_leaves_training_alone(tiny_dataset, tmp_path, caplog):
    recorder = _fit(tiny_dataset, tmp_path, ProgressiveResize(size=64, epochs=1), epochs=1)
    assert recorder.sizes[("train", 0)] == {48}
    assert "not smaller than data.image_size=48" in caplog.text


@pytest.mark.parametrize(("size", "epochs", "message"), [(4, 1, "at least 8"), (64, -1, ">= 0")])
def test_bad_settings_are_named(size, epochs, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveResize(size=size, epochs=epochs)

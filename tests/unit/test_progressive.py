"""Progressive resizing: early epochs train on smaller images, later ones (and every validation) at full size."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from crackclf.data.datamodule import CrackDataModule
from crackclf.models.module import CrackClassifier
from crackclf.training.progressive import ProgressiveResize


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
    data = CrackDataModule(str(tiny_dataset), image_size=image_size, batch_size=16, cache_dir=str(tmp_path / "c"),
                           progress=False, min_per_class=1)
    model = CrackClassifier({"name": "lcnet_050", "pretrained": False},
                            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), image_size=image_size)
    recorder = _RecordSizes()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[resize, recorder],
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
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

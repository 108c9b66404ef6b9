"""Progressive resizing: the first epochs train on smaller images, the last ones at the data's full size.

A training step at 64 px costs about half of one at 96 px on CPU (docs/recipe.md). The idea: coarse features need
no fine detail, and the final full-size epochs learn the thin cracks and re-fit BatchNorm to the size that is
validated, tested and deployed. Validation always runs at the full size. Measured for the CPU recipe (E2 in
docs/recipe.md) it did not pay: the accuracy lost to the change of size outweighed the cheaper epochs, so it is off
by default (``epochs: 0``).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl

from crackclf.errors import UsageError
from crackclf.training.contracts import TrainingData, training_data

log = logging.getLogger(__name__)


class ProgressiveResize(pl.Callback):
    """Train the first ``epochs`` epochs at ``size`` px, then at the data module's ``image_size``.

    Args:
        size: side in pixels of the early training images (smaller than ``data.image_size``).
        epochs: how many epochs train at ``size``; 0 disables the callback.
    """

    def __init__(self, size: int, epochs: int) -> None:
        if size < 8:
            raise UsageError(f"callbacks.progressive_resize.size={size} must be at least 8 pixels, e.g. 64.")
        if epochs < 0:
            raise UsageError(f"callbacks.progressive_resize.epochs={epochs} must be >= 0 (0 disables it).")
        self.size, self.epochs = int(size), int(epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule: TrainingData = training_data(trainer, "callbacks.progressive_resize")
        full = int(datamodule.image_size)
        if self.size >= full:  # e.g. a quick run at data.image_size=32: nothing to shrink
            if trainer.current_epoch == 0 and self.epochs:
                log.warning("callbacks.progressive_resize.size=%d is not smaller than data.image_size=%d: every "
                            "epoch trains at %d px", self.size, full, full)
            return
        early = trainer.current_epoch < self.epochs
        datamodule.train_size = self.size if early else None
        if trainer.current_epoch in (0, self.epochs) and self.epochs:
            log.info("epoch %d: training at %d px", trainer.current_epoch, self.size if early else full)

"""A callback for the crash tests: Ctrl-C (SIGINT to the training process itself) at an exact point of training.

Configured in every run of a test (``+callbacks.interrupt._target_=tests.interrupt.InterruptAt``), so that the
resumed run has the same configuration fingerprint as the stopped one; only a run whose environment names a point
(``CRACKCLF_TEST_INTERRUPT=<train|validation>:<epoch>:<batch>``) is stopped there.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl

ENV = "CRACKCLF_TEST_INTERRUPT"


class InterruptAt(pl.Callback):
    """Ctrl-C at the start of batch ``batch`` of epoch ``epoch``'s training or validation pass, as ``ENV`` says."""

    def __init__(self) -> None:
        point = os.environ.get(ENV)
        self.point = None
        if point:
            stage, epoch, batch = point.split(":")
            self.point = (stage, int(epoch), int(batch))

    def _maybe_stop(self, trainer: pl.Trainer, stage: str, batch_idx: int) -> None:
        if self.point == (stage, trainer.current_epoch, batch_idx) and not trainer.sanity_checking:
            self.point = None
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at once, as a terminal's Ctrl-C

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._maybe_stop(trainer, "train", batch_idx)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._maybe_stop(trainer, "validation", batch_idx)

"""Checkpoint writing that survives a kill at any moment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from crackclf.utils import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it into place, so the previous one stays intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))

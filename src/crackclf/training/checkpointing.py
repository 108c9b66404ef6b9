"""Checkpoint writing that survives a kill at any moment."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from crackclf.utils import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file and rename it into place, so the previous one stays intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        # Serialise in memory first: torch.save onto a full disk fails with a cryptic RuntimeError, a plain write
        # with ENOSPC, which atomic_write turns into a clear DiskFullError (and the previous file stays intact).
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(buffer.getbuffer()))

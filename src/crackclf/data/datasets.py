"""The two ways images reach a batch: whole batches gathered from the decode-once cache, or one decoded file at a
time (``data.cache=false``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from crackclf.data.images import ImageError, load_resized
from crackclf.errors import CrackclfError

__all__ = ["CachedBatches", "DataError", "FileImages"]

log = logging.getLogger(__name__)


class DataError(CrackclfError, ValueError):
    """The data cannot be used for training; the message says which folder/file and what to do."""


class CachedBatches(Dataset):
    """Index with a list of row numbers → one whole batch from the in-memory uint8 cache (no per-item Python)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels  # images: (N, 3, H, W) uint8, planar

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(rows, device=self.images.device)
        # index_select: a row gather ~10x faster on CPU than advanced indexing
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class FileImages(Dataset):
    """Per-file path (``data.cache=false``): decode and resize each image when it is asked for.

    A file that has become unreadable since the inventory is logged and replaced by the next one, so a
    DataLoader worker never dies of one bad file.
    """

    def __init__(self, paths: list[Path], labels: list[int], size: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.paths)):
            position = (index + attempt) % len(self.paths)
            try:
                array = load_resized(self.paths[position], self.size)
                return torch.from_numpy(array).permute(2, 0, 1), self.labels[position]
            except ImageError as error:
                log.warning("skipping unreadable training image %s", error)
        raise DataError("no readable image left in this dataset")

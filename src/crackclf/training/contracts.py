"""What the training callbacks need from the data: declared here, next to its users, so that they depend on a
contract and not on :class:`crackclf.data.datamodule.CrackDataModule` (which satisfies it)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from crackclf.errors import UsageError

__all__ = ["TrainingData", "training_data"]


@runtime_checkable
class TrainingData(Protocol):
    """The training-order and input-size contract of the datamodule, as the callbacks use it.

    - :class:`crackclf.training.focus.HardExampleFocus` reads ``seed``, ``train_rows_count``,
      ``train_draws_per_epoch`` and ``last_train_rows``, and calls ``set_train_order``.
    - :class:`crackclf.training.progressive.ProgressiveResize` reads ``image_size`` and sets ``train_size``.
    """

    seed: int
    image_size: int
    #: Side of the training batches when smaller than ``image_size``; ``None``: ``image_size``.
    train_size: int | None
    #: Row numbers of the training batch being trained on (``None`` before the first).
    last_train_rows: torch.Tensor | None

    @property
    def train_rows_count(self) -> int:
        """Rows of the training split (the row numbers the training batches are drawn from)."""
        ...

    @property
    def train_draws_per_epoch(self) -> int:
        """Rows one epoch draws over all ranks."""
        ...

    def set_train_order(self, order: torch.Tensor, epoch: int) -> None:
        """Train ``epoch`` on ``order`` (``train_draws_per_epoch`` row numbers, the same on every rank)."""
        ...


_MEMBERS = ("seed", "image_size", "train_size", "last_train_rows", "train_rows_count", "train_draws_per_epoch",
            "set_train_order")


def training_data(trainer: Any, user: str) -> TrainingData:
    """The trainer's datamodule, checked against :class:`TrainingData` (``user`` names the callback that needs it).

    Raises:
        UsageError: the run has no datamodule, or one without the contract's members.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if not isinstance(datamodule, TrainingData):
        raise UsageError(f"{user} needs a datamodule with {', '.join(_MEMBERS)} "
                         f"(crackclf.data.datamodule.CrackDataModule has them); this run's is "
                         f"{type(datamodule).__name__}. Train with data=<a conf/data YAML> or drop the callback.")
    return datamodule

"""LightningModule: a timm backbone with a 2-class head, cross-entropy, torchmetrics per stage and the
generalisation gap."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from crackclf.models.backbone import CrackNet, create_backbone, set_backbone_trainable

log = logging.getLogger(__name__)


def stage_metrics(prefix: str, threshold: float = 0.5) -> MetricCollection:
    """Accuracy, precision, recall, F1 and AUROC of the crack class, named ``<prefix>/acc`` etc."""
    return MetricCollection(
        {
            "acc": BinaryAccuracy(threshold=threshold),
            "precision": BinaryPrecision(threshold=threshold),
            "recall": BinaryRecall(threshold=threshold),
            "f1": BinaryF1Score(threshold=threshold),
            "auroc": BinaryAUROC(),
        },
        prefix=f"{prefix}/",
    )


class CrackClassifier(pl.LightningModule):
    """Binary crack classifier.

    Args:
        backbone: ``name``, ``pretrained`` (auto/true/false), ``weights`` (local file), ``freeze_epochs``,
            ``drop_rate`` and optional extra timm keyword arguments under ``kwargs``.
        optimizer: a partial optimizer (``params`` still missing), from the ``optimizer`` config group.
        scheduler: a partial LR-scheduler factory (``optimizer`` and ``total_steps`` still missing) or ``None``.
        image_size: input side in pixels (recorded with the model).
        class_names: names of class 0 and class 1.
        label_smoothing: cross-entropy label smoothing.
        max_gap: a final ``train/acc − val/acc`` above this flags the run as overfitting.
        channels_last: use the channels-last memory format (faster convolutions on many CPUs and GPUs).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        image_size: int = 64,
        class_names: tuple[str, str] = ("no_crack", "crack"),
        label_smoothing: float = 0.0,
        max_gap: float = 0.02,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        built = create_backbone(
            backbone["name"], backbone.get("pretrained", "auto"), backbone.get("weights"), num_classes=2,
            drop_rate=backbone.get("drop_rate", 0.0), **(backbone.get("kwargs") or {}),
        )
        self.pretrained_status = built.pretrained_status
        self.net = CrackNet(built.model, built.mean, built.std)
        self.freeze_epochs = int(backbone.get("freeze_epochs", 0) or 0)
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.decision_threshold = 0.5
        self.train_metrics = stage_metrics("train")
        self.val_metrics = stage_metrics("val")
        self.test_metrics = stage_metrics("test")
        self.val_acc_best = MaxMetric()
        self.last_val_acc: float | None = None
        self.history: list[dict[str, float]] = []  # per-epoch metrics, for plots without re-reading MLflow
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        probabilities = logits.float().softmax(dim=1)[:, 1]
        return loss, probabilities.detach(), labels

    # ---------------------------------------------------------------------------------------------------- train
    def on_train_epoch_start(self) -> None:
        if self.freeze_epochs:
            trainable = self.current_epoch >= self.freeze_epochs
            set_backbone_trainable(self.net.backbone, trainable)
            if self.current_epoch in (0, self.freeze_epochs):
                log.info("epoch %d: backbone %s", self.current_epoch, "unfrozen" if trainable else "frozen")

    def training_step(self, batch, batch_index: int) -> torch.Tensor:
        loss, probabilities, labels = self._step(batch)
        self.train_metrics.update(probabilities, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def on_train_epoch_end(self) -> None:
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        self.log_dict(values)
        if self.last_val_acc is not None:
            gap = float(values["train/acc"]) - self.last_val_acc
            self.log("train/gap", gap)
        self._record_history()

    # ----------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.val_outputs = []

    def validation_step(self, batch, batch_index: int) -> None:
        loss, probabilities, labels = self._step(batch)
        self.val_metrics.update(probabilities, labels)
        self.val_outputs.append((probabilities.cpu(), labels.cpu()))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        accuracy = values.pop("val/acc")
        self.log("val/acc", accuracy, prog_bar=True)
        self.log_dict(values)
        if not self.trainer.sanity_checking:
            self.last_val_acc = float(accuracy)
            self.val_acc_best(accuracy)
            self.log("val/acc_best", self.val_acc_best.compute())

    def validation_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Crack probabilities and labels of the last validation pass."""
        probabilities = torch.cat([p for p, _ in self.val_outputs]) if self.val_outputs else torch.empty(0)
        labels = torch.cat([y for _, y in self.val_outputs]) if self.val_outputs else torch.empty(0)
        return probabilities, labels

    # ---------------------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self.test_metrics = stage_metrics("test", self.decision_threshold).to(self.device)

    def test_step(self, batch, batch_index: int) -> None:
        loss, probabilities, labels = self._step(batch)
        self.test_metrics.update(probabilities, labels)
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict(values)

    # ------------------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters()])
        if self.scheduler_factory is None:
            return optimizer
        if _is_plateau(self.scheduler_factory):
            scheduler = self.scheduler_factory(optimizer=optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------- helpers
    def _record_history(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        metrics["epoch"] = self.current_epoch
        self.history.append(metrics)


def _is_plateau(factory: Callable) -> bool:
    target = getattr(factory, "func", factory)
    return isinstance(target, type) and issubclass(target, torch.optim.lr_scheduler.ReduceLROnPlateau)

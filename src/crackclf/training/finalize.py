"""The stage after fitting: the weights that will be deployed, their threshold, their test scores and their clean
train–validation gap, as one typed :class:`FinalReport` that the bundle, MLflow and the summary are built from."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crackclf.bundle import BundleInfo, source_tile_size
from crackclf.distributed import reduce_to_cpu
from crackclf.metrics import accuracy, balanced_accuracy, choose_threshold, confusion_matrix

__all__ = ["FinalReport", "bundle_info", "finalize"]

log = logging.getLogger("crackclf.train")


@dataclass(frozen=True)
class FinalReport:
    """What a finished fit measured on the deployed (best) weights."""

    epochs: int
    best_checkpoint: str  #: "" when no checkpoint callback ran
    threshold: float
    val_acc: float
    val_loss: float
    train_clean_acc: float
    train_val_gap: float
    overfitting: bool
    test: dict[str, float] = field(default_factory=dict)  #: ``test/acc`` … (empty without a test split)
    test_confusion: np.ndarray | None = None
    #: ``val/<source>/acc``, ``val/<source>/balanced_acc``, ``test/<source>/…`` of a multi-source run (else empty)
    per_source: dict[str, float] = field(default_factory=dict)

    def results(self) -> dict[str, Any]:
        """The flat metrics ``train.run`` returns (and sweeps optimise)."""
        return {"epochs": self.epochs, "val/acc": self.val_acc, "val/loss": self.val_loss,
                "threshold": self.threshold, "train/clean_acc": self.train_clean_acc,
                "train_val_gap": self.train_val_gap, **self.test, **self.per_source}


def finalize(trainer: Any, model: Any, datamodule: Any, *, threshold_mode: str, target_recall: float,
             max_gap: float, threshold_source: str | None = None) -> FinalReport:
    """Reload the best weights, choose the threshold on validation (on ``threshold_source``'s validation images
    alone when that source of a multi-source run has both classes there), test, and measure the clean train–val
    gap."""
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    best_step = None
    if best_path:
        saved = torch.load(best_path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state_dict"])
        best_step = saved.get("global_step")

    # Threshold on validation data only, with the weights that will be deployed. When they are the last epoch's,
    # that epoch's validation pass (outputs and synchronised metrics) already scored them: no second pass.
    val_results = _last_validation(trainer, model, best_step)
    if val_results is None:
        val_results = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    val_probabilities, val_labels = model.validation_probabilities()
    chosen_probabilities, chosen_labels = _threshold_rows(datamodule, val_probabilities.numpy(), val_labels.numpy(),
                                                          threshold_source)
    model.decision_threshold = choose_threshold(chosen_probabilities, chosen_labels, threshold_mode, target_recall)
    # Per source like the overall metrics: validation at 0.5 (as val/acc), test at the chosen threshold.
    per_source = per_source_metrics(datamodule, "val", val_probabilities.numpy(), val_labels.numpy(), 0.5)
    test_results = trainer.test(model, datamodule=datamodule, verbose=False)[0] if datamodule.rows_of("test") else {}
    test_confusion = None
    if test_results:
        probabilities, labels = model.test_probabilities()
        test_confusion = confusion_matrix(probabilities.numpy(), labels.numpy(), model.decision_threshold)
        per_source |= per_source_metrics(datamodule, "test", probabilities.numpy(), labels.numpy(),
                                         model.decision_threshold)

    # The generalisation gap of the deployed weights: a sample of the training split as large as validation,
    # unaugmented, against validation, both at 0.5 like val/acc. (The per-epoch train/gap compares accuracy on
    # augmented, partly hard-example batches while the weights change: a curve, not this measurement.)
    train_sample = datamodule.train_sample_dataloader(len(datamodule.rows_of("val")))
    train_accuracy = accuracy(_confusion(model, datamodule, train_sample, trainer, 0.5))
    val_acc = float(val_results["val/acc"])
    gap = train_accuracy - val_acc
    overfitting = gap > max_gap
    if overfitting:
        log.warning("train (unaugmented sample) - val accuracy gap %.4f exceeds model.max_gap=%s: the run looks "
                    "overfitted", gap, max_gap)
    return FinalReport(epochs=trainer.current_epoch, best_checkpoint=best_path, threshold=model.decision_threshold,
                       val_acc=val_acc, val_loss=float(val_results["val/loss"]), train_clean_acc=train_accuracy,
                       train_val_gap=gap, overfitting=overfitting,
                       test={k: float(v) for k, v in test_results.items()}, test_confusion=test_confusion,
                       per_source=per_source)


def _sources_of(datamodule: Any, split: str, probabilities: np.ndarray, labels: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pass's probabilities and labels (gathered over the DDP ranks, in the order ``datamodule.gathered_rows``
    gives) with each row's source name; rows that DDP padding evaluated twice count once."""
    rows = datamodule.gathered_rows(split)
    rows, first = np.unique(rows, return_index=True)  # padding repeats a shard's first rows: keep one of each
    split_rows = datamodule.rows_of(split)
    return probabilities[first], labels[first], np.array([split_rows[row].source for row in rows])


def _threshold_rows(datamodule: Any, probabilities: np.ndarray, labels: np.ndarray, source: str | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows the threshold is chosen on: all, or ``source``'s where it has both classes there."""
    if not source:
        return probabilities, labels
    names = list(datamodule.source_names or ())
    if source not in names:  # a warning, not an error: the training it comes after is kept
        log.warning("threshold.source=%s is not a source of this run (its sources: %s); the threshold is chosen on "
                    "all validation images", source, names or "one folder, data.root")
        return probabilities, labels
    probabilities, labels, sources = _sources_of(datamodule, "val", probabilities, labels)
    chosen = sources == source
    if len(set(labels[chosen].tolist())) < 2:
        log.warning("threshold.source=%s: its validation split holds %d image(s), not both classes; the threshold "
                    "is chosen on all validation images", source, int(chosen.sum()))
        return probabilities, labels
    return probabilities[chosen], labels[chosen]


def per_source_metrics(datamodule: Any, split: str, probabilities: np.ndarray, labels: np.ndarray,
                       threshold: float) -> dict[str, float]:
    """``<split>/<source>/acc`` and ``<split>/<source>/balanced_acc`` of each source of a multi-source run, from
    the pass's probabilities (gathered over the DDP ranks, in the order ``datamodule.gathered_rows`` gives); empty
    for a single-folder run. Rows that DDP padding evaluated twice count once."""
    names = datamodule.source_names
    if not names or not len(probabilities):
        return {}
    probabilities, labels, sources = _sources_of(datamodule, split, probabilities, labels)
    metrics: dict[str, float] = {}
    for name in names:
        chosen = sources == name
        if not chosen.any():
            continue
        matrix = confusion_matrix(probabilities[chosen], labels[chosen], threshold)
        metrics[f"{split}/{name}/acc"] = accuracy(matrix)
        balanced = balanced_accuracy(matrix)
        if not math.isnan(balanced):  # undefined where the source's split holds one class only
            metrics[f"{split}/{name}/balanced_acc"] = balanced
    return metrics


def bundle_info(cfg: Any, model: Any, datamodule: Any, threshold: float, run_id: str | None) -> BundleInfo:
    """What travels with the deployed weights: backbone, input size, normalisation, classes, threshold, source.

    The architecture is read from the network that was built (its timm name and extra arguments), so the bundle
    rebuilds what was trained whatever the config said."""
    return BundleInfo(
        backbone=model.backbone_name, image_size=cfg.data.image_size, mean=tuple(model.net.mean.flatten().tolist()),
        std=tuple(model.net.std.flatten().tolist()), class_names=tuple(cfg.data.class_names), threshold=threshold,
        run_id=run_id, pretrained_status=model.pretrained_status, timm_kwargs=dict(model.timm_kwargs),
        tile_size=source_tile_size(datamodule.verify_report),
    )


def _last_validation(trainer: Any, model: Any, best_step: int | None) -> dict[str, float] | None:
    """``val/acc`` and ``val/loss`` of the fit's last validation pass when it scored the best weights (saved after
    the last training step: the last epoch was the best, not e.g. the linear probe's model saved before the first
    step; and this process ran that pass: a resumed run may not have), else ``None``."""
    last_epoch = trainer.current_epoch - 1  # after fit, current_epoch counts the epochs trained
    metrics = trainer.callback_metrics
    if (best_step is None or best_step != trainer.global_step or not model.val_outputs
            or getattr(model, "val_outputs_epoch", None) != last_epoch
            or "val/acc" not in metrics or "val/loss" not in metrics):
        return None
    return {"val/acc": float(metrics["val/acc"]), "val/loss": float(metrics["val/loss"])}


def _confusion(model: Any, datamodule: Any, loader: Any, trainer: Any, threshold: float) -> np.ndarray:
    """Confusion matrix of ``loader``'s images, unaugmented, at ``threshold`` (rows: true, columns: predicted);
    under DDP summed over the ranks."""
    device = trainer.strategy.root_device  # trainer.test() leaves the module on the CPU: back to the GPU if any
    matrix = np.zeros((2, 2), dtype=np.int64)
    model.to(device).eval()
    with torch.no_grad():
        for batch in loader:
            images, labels = datamodule.on_after_batch_transfer([t.to(device) for t in batch], 0)
            probabilities = model(images).softmax(1)[:, 1].cpu().numpy()
            matrix += confusion_matrix(probabilities, labels.cpu().numpy(), threshold)
    if trainer.world_size > 1:  # DDP: each rank counted its own shard
        matrix = reduce_to_cpu(trainer.strategy, torch.from_numpy(matrix), reduce_op="sum").numpy()
    return matrix

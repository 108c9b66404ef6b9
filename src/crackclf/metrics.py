"""How a crack is decided and scored, for training and inference alike: the metrics of a stage, the confusion matrix
at a threshold, accuracy and balanced accuracy from it, and the choice of the deployment threshold on validation.

Changing "how a crack is decided" (the threshold rule, what counts as a hit) touches this module only."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from crackclf.errors import UsageError

__all__ = ["THRESHOLD_MODES", "accuracy", "balanced_accuracy", "binary_metrics", "choose_threshold",
           "confusion_matrix", "stage_metrics"]

THRESHOLD_MODES = ("f1", "recall", "balanced")


def stage_metrics(prefix: str, threshold: float = 0.5) -> MetricCollection:
    """Accuracy, precision, recall, F1 and AUROC of the crack class, named ``<prefix>/acc`` etc.; a crack is
    ``probability >= threshold`` as everywhere in crackclf (the Predictor, :func:`confusion_matrix`)."""
    # torchmetrics calls ``p > threshold`` a crack: the next float32 below the threshold makes that ``p >= threshold``
    # for float32 probabilities. It matters: the chosen threshold is one of the validation probabilities, and a
    # model's saturated probabilities tie with it. At a threshold of 0 that float is negative, which torchmetrics'
    # constructor refuses (its update does not check it again): the metrics are built at 0 and then given it, so a
    # probability of exactly 0 is a crack there too, as it is for the Predictor.
    below = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    thresholded = {"acc": BinaryAccuracy, "precision": BinaryPrecision, "recall": BinaryRecall, "f1": BinaryF1Score}
    metrics = {name: cls(threshold=max(0.0, below)) for name, cls in thresholded.items()}
    for metric in metrics.values():
        metric.threshold = below
    return MetricCollection({**metrics, "auroc": BinaryAUROC()}, prefix=f"{prefix}/")


def confusion_matrix(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """2x2 counts at ``threshold`` (a crack is ``probability >= threshold``); rows: true class, columns: predicted."""
    predicted = (np.asarray(probabilities) >= threshold).astype(np.int64)
    matrix = np.zeros((2, 2), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), predicted), 1)
    return matrix


def accuracy(matrix: np.ndarray) -> float:
    """Share of correct decisions in a confusion matrix (0 for an empty one)."""
    return float(np.trace(matrix) / max(1, matrix.sum()))


def balanced_accuracy(matrix: np.ndarray) -> float:
    """Mean of the per-class recalls: what accuracy means when one class is rare (NaN without both classes)."""
    per_class = matrix.sum(axis=1)
    if (per_class == 0).any():
        return math.nan
    return float(np.mean(np.diag(matrix) / per_class))


def binary_metrics(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[dict[str, float],
                                                                                            np.ndarray]:
    """The training metrics (same torchmetrics definitions) at ``threshold``, balanced accuracy, and the confusion
    matrix. AUROC and balanced accuracy are NaN when only one class is present."""
    probs, truth = torch.as_tensor(probabilities, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    confusion = confusion_matrix(probs.numpy(), truth.numpy(), threshold)
    computed = {k.removeprefix("eval/"): float(v) for k, v in stage_metrics("eval", threshold)(probs, truth).items()}
    if len(set(truth.tolist())) < 2:
        computed["auroc"] = math.nan
    computed["balanced_acc"] = balanced_accuracy(confusion)
    computed.update({"images": float(len(truth)), "threshold": float(threshold)})
    return computed, confusion


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, mode: str = "f1", target_recall: float = 0.99
                     ) -> float:
    """The crack-probability threshold for deployment.

    ``mode="f1"`` maximises F1 of the crack class; ``mode="recall"`` returns the highest threshold whose recall is
    still ≥ ``target_recall`` (a missed crack costs more than a false alarm); ``mode="balanced"`` maximises balanced
    accuracy (the mean of recall and specificity: unlike F1 it does not reward calling everything a crack where
    most validation images are cracks). Ties prefer the threshold nearest 0.5.
    """
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels).astype(bool)
    if mode not in THRESHOLD_MODES:
        raise UsageError(f"threshold mode {mode!r} must be 'f1' or 'recall'")
    if probabilities.size == 0 or labels.all() or not labels.any():
        return 0.5
    candidates = np.unique(np.concatenate([probabilities, [0.5]]))
    positives = labels.sum()
    order = np.argsort(-probabilities)
    sorted_probs, sorted_labels = probabilities[order], labels[order]
    true_pos = np.cumsum(sorted_labels)
    # For each candidate t, predictions are probabilities >= t: count via searchsorted on the descending list.
    counts = np.searchsorted(-sorted_probs, -candidates, side="right")
    tp = np.where(counts > 0, true_pos[np.maximum(counts - 1, 0)], 0)
    recall = tp / positives
    precision = np.where(counts > 0, tp / np.maximum(counts, 1), 1.0)
    if mode == "recall":
        ok = recall >= target_recall
        return float(candidates[ok].max()) if ok.any() else float(candidates.min())
    if mode == "balanced":
        specificity = 1 - (counts - tp) / (labels.size - positives)
        score = (recall + specificity) / 2
    else:
        score = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    best = np.flatnonzero(np.isclose(score, score.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])

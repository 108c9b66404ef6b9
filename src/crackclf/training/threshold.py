"""Choosing the decision threshold on validation data, and counting decisions at a threshold."""

from __future__ import annotations

import numpy as np


def confusion_matrix(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """2x2 counts at ``threshold`` (a crack is ``probability >= threshold``); rows: true class, columns: predicted."""
    predicted = (np.asarray(probabilities) >= threshold).astype(np.int64)
    matrix = np.zeros((2, 2), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), predicted), 1)
    return matrix


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, mode: str = "f1", target_recall: float = 0.99
                     ) -> float:
    """The crack-probability threshold for deployment.

    ``mode="f1"`` maximises F1 of the crack class; ``mode="recall"`` returns the highest threshold whose recall is
    still ≥ ``target_recall`` (a missed crack costs more than a false alarm). Ties prefer the threshold nearest 0.5.
    """
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels).astype(bool)
    if mode not in ("f1", "recall"):
        raise ValueError(f"threshold mode {mode!r} must be 'f1' or 'recall'")
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
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    best = np.flatnonzero(np.isclose(f1, f1.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])

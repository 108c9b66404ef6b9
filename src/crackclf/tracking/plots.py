"""Figures logged with runs: learning curves and confusion matrices (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: Sequence[dict[str, float]], out: Path, title: str = "") -> Path:
    """Accuracy and loss, train vs validation, one point per epoch."""
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [int(h["epoch"]) for h in history]
    for axis, metric in ((acc_axis, "acc"), (loss_axis, "loss")):
        for stage, style in (("train", "o-"), ("val", "s-")):
            values = [h.get(f"{stage}/{metric}", np.nan) for h in history]
            axis.plot(epochs, values, style, label=f"{stage}/{metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    acc_axis.set_title("accuracy")
    loss_axis.set_title("loss")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], out: Path, title: str = "") -> Path:
    """A 2×2 confusion matrix with counts and row percentages (rows: true class)."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            axis.text(j, i, f"{matrix[i, j]}\n{100 * matrix[i, j] / totals[i, 0]:.2f}%", ha="center", va="center",
                      color=color)
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or "confusion matrix")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out

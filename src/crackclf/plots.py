"""Figures logged with runs: learning curves, confusion matrices, ROC/PR curves, image grids and crack-map overlays
(matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(figure, out: Path, title: str = "") -> Path:
    """Lay out, write as PNG and close a figure (closing matters: pyplot keeps every open figure alive)."""
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


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
    return _save(figure, out, title)


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
    return _save(figure, out)


def plot_roc_pr(roc: tuple[np.ndarray, np.ndarray], pr: tuple[np.ndarray, np.ndarray], auroc: float,
                average_precision: float, out_roc: Path, out_pr: Path, title: str = "") -> tuple[Path, Path]:
    """ROC curve (``roc`` = false-positive rates, true-positive rates) and precision-recall curve
    (``pr`` = recalls, precisions), one PNG each."""
    for (x, y), out, (xlabel, ylabel), label, diagonal in (
        (roc, out_roc, ("false positive rate", "true positive rate"), f"AUROC {auroc:.4f}", True),
        (pr, out_pr, ("recall", "precision"), f"AP {average_precision:.4f}", False),
    ):
        figure, axis = plt.subplots(figsize=(4.5, 4.2))
        axis.plot(x, y, "-", label=label)
        if diagonal:
            axis.plot([0, 1], [0, 1], ":", color="grey")
        axis.set_xlim(-0.01, 1.01)
        axis.set_ylim(-0.01, 1.01)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right" if diagonal else "lower left")
        axis.set_title(title or ("ROC" if diagonal else "precision-recall"))
        _save(figure, out)
    return out_roc, out_pr


def plot_image_grid(images: Sequence[np.ndarray], captions: Sequence[str], out: Path, title: str = "",
                    columns: int = 4) -> Path:
    """HWC uint8 images in a grid, each with a caption (e.g. the worst mistakes of an evaluation)."""
    count = max(1, len(images))
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions, strict=False):
        axis.imshow(image)
        axis.set_title(caption, fontsize=8)
    if not images:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    return _save(figure, out, title)


def crack_map_overlay(photo: np.ndarray, probability: np.ndarray, cracked_boxes: Sequence[tuple[int, int, int, int]],
                      out: Path | BinaryIO, max_side: int = 1600, alpha: float = 0.45) -> Path | BinaryIO:
    """The photo with a heat map of the crack probability and the cracked tiles outlined, as a PNG written to
    ``out`` (a path, or a binary stream such as the HTTP API's in-memory buffer).

    ``photo``: HWC uint8; ``probability``: per-pixel map of the same height and width, in [0, 1];
    ``cracked_boxes``: (x0, y0, x1, y1) in photo pixels. Large photos are drawn at ``max_side`` pixels.
    """
    from PIL import Image, ImageDraw

    height, width = photo.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray(photo).resize(size, Image.BILINEAR)
    heat = Image.fromarray((probability * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    colours = (matplotlib.colormaps["inferno"](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(base, Image.fromarray(colours), alpha)
    draw = ImageDraw.Draw(blended)
    line = max(2, round(3 * scale))
    for x0, y0, x1, y1 in cracked_boxes:
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=(0, 255, 0), width=line)
    blended.save(out, format="PNG")
    return out

"""Evaluate a model on a labelled folder (the training layout: one sub-folder per class).

Metrics (accuracy, balanced accuracy — the mean of both classes' recalls, honest on imbalanced folders —,
precision, recall, F1 of the crack class at the model's threshold; AUROC), the confusion matrix,
ROC and PR curves, a grid of the worst mistakes (most confident wrong answers), every prediction as CSV — printed,
written to an output folder and logged as an MLflow *evaluation run* tagged with the model's training run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crackclf import plots
from crackclf.data.download import CLASS_DIRS
from crackclf.data.images import describe_source, load_resized
from crackclf.data.inventory import list_class_files
from crackclf.errors import CrackclfError
from crackclf.inference.predictor import Prediction, Predictor
from crackclf.metrics import binary_metrics
from crackclf.utils import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

EVAL_EXPERIMENT = "crack-eval"  # used when the model has no training run to sit beside
#: Tags linking an evaluation run to its model.
TAG_KIND, TAG_MODEL_RUN, TAG_MODEL = "crackclf.kind", "crackclf.model_run_id", "crackclf.model_id"


class EvaluationError(CrackclfError, ValueError):
    """A folder that cannot be evaluated; the message says what to do."""


@dataclass
class Evaluation:
    """Everything an evaluation produced."""

    metrics: dict[str, float]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    predictions: list[Prediction]
    labels: list[int]  # true label per prediction
    failed: list[Prediction]  # unreadable inputs (not in the metrics)
    out_dir: Path
    artifacts: list[Path] = field(default_factory=list)
    run_id: str | None = None

    def worst_mistakes(self, count: int = 16) -> list[tuple[Prediction, int]]:
        """Wrong predictions, most confident first (the largest distance between probability and truth)."""
        wrong = [(p, y) for p, y in zip(self.predictions, self.labels, strict=True) if int(p.is_crack) != y]
        return sorted(wrong, key=lambda item: -abs(item[0].probability - item[1]))[:count]


def labelled_files(root: Path, class_dirs: tuple[str, str] = CLASS_DIRS) -> list[tuple[Path, int]]:
    """(path, label) of every candidate image under ``root/<class_dir>`` (recursive)."""
    root = Path(root)
    missing = [d for d in class_dirs if not (root / d).is_dir()]
    if not root.is_dir() or missing:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise EvaluationError(
            f"--data {root}: expected the sub-folders {list(class_dirs)} (negative class first) but "
            f"{'the folder does not exist' if not root.is_dir() else f'found {found[:10]}'}; "
            "pass --class-dirs NEG POS for other names."
        )
    files = [(root / relative, label) for relative, label in list_class_files(root, tuple(class_dirs))]
    if not files:
        raise EvaluationError(f"--data {root}: no image files under {list(class_dirs)}.")
    return files


def evaluate(predictor: Predictor, data: Path, *, class_dirs: tuple[str, str] = CLASS_DIRS,
             out_dir: Path | None = None, mistakes: int = 16, progress: bool = True, log_mlflow: bool = True,
             experiment: str | None = None) -> Evaluation:
    """Predict every image of ``data`` and write metrics, plots and predictions into ``out_dir``."""
    files = labelled_files(Path(data), class_dirs)
    out_dir = Path(out_dir or Path("reports") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = list(predictor.predict_sources([p for p, _ in files], progress=progress, total=len(files)))
    good = [(p, y) for p, (_, y) in zip(predictions, files, strict=True) if p.ok]
    failed = [p for p in predictions if not p.ok]
    if not good:
        raise EvaluationError(f"--data {data}: none of the {len(files)} images could be read (e.g. {failed[0].error}).")
    probabilities = np.array([p.probability for p, _ in good], dtype=np.float32)
    labels = np.array([y for _, y in good], dtype=np.int64)
    metrics, confusion = binary_metrics(probabilities, labels, predictor.threshold)
    metrics["unreadable"] = float(len(failed))
    result = Evaluation(metrics, confusion, [p for p, _ in good], labels.tolist(), failed, out_dir)
    result.artifacts = _write_outputs(result, predictor, probabilities, labels, files, mistakes)
    if log_mlflow:
        result.run_id = _log_run(result, predictor, Path(data), experiment)
    return result


def _write_outputs(result: Evaluation, predictor: Predictor, probabilities: np.ndarray, labels: np.ndarray,
                   files: list[tuple[Path, int]], mistakes: int) -> list[Path]:
    out = result.out_dir
    names = predictor.class_names
    truth = {describe_source(path): label for path, label in files}  # Prediction.source is the printable name
    originals = {describe_source(path): path for path, _ in files}

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["path", "true_label", "probability", "label", "correct", "model_id", "error"])
            for p in result.predictions + result.failed:
                true_name = names[truth[p.source]]
                correct = "" if not p.ok else str(p.label == true_name).lower()
                probability = "" if p.probability is None else f"{p.probability:.6f}"
                writer.writerow([p.source, true_name, probability, p.label or "", correct, p.model_id, p.error or ""])

    artifacts = [atomic_write(out / "predictions.csv", write_csv)]
    metrics_doc = {**result.metrics, "confusion": result.confusion.tolist(), "class_names": list(names),
                   "model": predictor.describe(),
                   "unreadable_files": [{"path": p.source, "reason": p.error} for p in result.failed]}
    artifacts.append(atomic_write_text(out / "metrics.json", json.dumps(metrics_doc, indent=2, default=str)))
    title = f"threshold {predictor.threshold:.3f}"
    artifacts.append(plots.plot_confusion(result.confusion, names, out / "confusion.png", title=title))
    if len(set(labels.tolist())) == 2:
        from torchmetrics.functional.classification import (
            binary_average_precision,
            binary_precision_recall_curve,
            binary_roc,
        )

        probs, truth_t = torch.from_numpy(probabilities), torch.from_numpy(labels)
        fpr, tpr, _ = binary_roc(probs, truth_t)
        precision, recall, _ = binary_precision_recall_curve(probs, truth_t)
        average_precision = float(binary_average_precision(probs, truth_t))
        artifacts += plots.plot_roc_pr((fpr.numpy(), tpr.numpy()), (recall.numpy(), precision.numpy()),
                                       result.metrics["auroc"], average_precision, out / "roc.png", out / "pr.png")
    worst = result.worst_mistakes(mistakes)
    images = [load_resized(originals[p.source], 128) for p, _ in worst]
    captions = [f"{Path(p.source).name}\ntrue {names[y]}, p(crack)={p.probability:.3f}" for p, y in worst]
    artifacts.append(plots.plot_image_grid(images, captions, out / "worst_mistakes.png",
                                           title=f"{len(worst)} worst mistakes ({title})"))
    return artifacts


def _log_run(result: Evaluation, predictor: Predictor, data: Path, experiment: str | None) -> str:
    from crackclf.tracking import mlflow as tracking

    model_run = predictor.info.run_id
    if experiment is None:
        try:
            experiment = tracking.experiment_name_of(model_run) if model_run else EVAL_EXPERIMENT
        except Exception:  # noqa: BLE001 - the model's run lives in another store: evaluate on its own
            experiment = EVAL_EXPERIMENT
    tags = {TAG_KIND: "evaluation", TAG_MODEL: predictor.model_id, "data": str(data.resolve())}
    if model_run:
        tags[TAG_MODEL_RUN] = model_run
    run_id = tracking.start_run(experiment, f"eval-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    status = "FAILED"
    try:
        params = {"data": str(data.resolve()), "threshold": predictor.threshold, "tta": predictor.tta,
                  "backend": predictor.backend, "model_id": predictor.model_id}
        tracking.log_params(run_id, params)
        tracking.log_metrics(run_id, {f"eval/{k}": v for k, v in result.metrics.items() if not math.isnan(v)})
        for path in result.artifacts:
            tracking.log_artifact(run_id, path, "evaluation")
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, status)
    return run_id


def format_metrics(result: Evaluation, predictor: Predictor) -> str:
    """The printed summary: metrics, confusion matrix, unreadable files, where the outputs are."""
    m, names = result.metrics, predictor.class_names
    rows = [("model", predictor.model_id), ("backend", predictor.backend), ("threshold", f"{predictor.threshold:.4f}"),
            ("images", f"{int(m['images'])}"), ("unreadable", f"{len(result.failed)}")]
    rows += [(k, f"{m[k]:.4f}") for k in ("acc", "balanced_acc", "precision", "recall", "f1", "auroc")]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    c = result.confusion
    lines += ["  confusion (rows: true, columns: predicted)",
              f"    {'':>10} {names[0]:>10} {names[1]:>10}",
              f"    {names[0]:>10} {c[0, 0]:>10} {c[0, 1]:>10}",
              f"    {names[1]:>10} {c[1, 0]:>10} {c[1, 1]:>10}"]
    lines += [f"  unreadable: {p.source}: {p.error}" for p in result.failed[:50]]
    lines.append(f"  outputs: {result.out_dir}")
    if result.run_id:
        lines.append(f"  MLflow evaluation run: {result.run_id}")
    return "\n".join(lines)


def summary_dict(result: Evaluation) -> dict[str, Any]:
    return {**result.metrics, "confusion": result.confusion.tolist(), "run_id": result.run_id,
            "out_dir": str(result.out_dir)}

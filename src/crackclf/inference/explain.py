"""Grad-CAM overlays (``grad-cam`` package): where in an image the model found evidence for its answer.

The CAM is taken at the deepest backbone stage that still has a usable spatial grid at the model's input size
(≥ 7 cells a side, e.g. the stride-8 stage for a 64 px ResNet; the last stage would be 2×2), upsampled onto the
image. The target is the predicted class, so a false alarm shows what looked like a crack.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from crackclf.bundle import BundleError
from crackclf.data.images import ImageSource, load_resized
from crackclf.errors import UsageError
from crackclf.inference.predictor import Prediction, Predictor
from crackclf.plots import plot_image_grid

#: Smallest CAM grid (cells a side) worth showing; deeper stages with fewer cells are skipped.
MIN_CAM_CELLS = 7
DISPLAY_SIZE = 224


def target_layer(network: nn.Module, image_size: int, name: str | None = None) -> nn.Module:
    """The layer Grad-CAM reads: ``name`` (a dotted module path) or the deepest timm feature stage whose output
    has ≥ ``MIN_CAM_CELLS`` cells a side at ``image_size``."""
    backbone = getattr(network, "backbone", network)
    modules = dict(backbone.named_modules())
    if name:
        if name not in modules:
            raise UsageError(f"--layer {name!r} is not a module of {type(backbone).__name__}; e.g. "
                             f"{', '.join(list(modules)[1:6])}.")
        return modules[name]
    stages = [f for f in getattr(backbone, "feature_info", []) if f.get("module") in modules]
    if not stages:
        convolutions = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        return convolutions[-1]
    usable = [f for f in stages if image_size / f["reduction"] >= MIN_CAM_CELLS] or stages[:1]
    return modules[usable[-1]["module"]]


def grad_cams(predictor: Predictor, arrays: np.ndarray, targets: Sequence[int], layer: str | None = None
              ) -> np.ndarray:
    """Grad-CAM maps ``(N, S, S)`` in [0, 1] for uint8 images ``(N, S, S, 3)`` at the model's size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    network = predictor.model.network
    if network is None:
        raise BundleError(f"Grad-CAM needs PyTorch weights; {predictor.model_id} is an ONNX model. Give the .ckpt, "
                          "runs:/<run_id> or models:/<name>/<version> it was exported from.")
    network = network.eval()
    images = torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2))).float().div_(255.0)
    with GradCAM(model=network, target_layers=[target_layer(network, predictor.image_size, layer)]) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.asarray(maps, dtype=np.float32)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The CAM (any size, [0, 1]) as a colour heat map over an HWC uint8 image."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    return show_cam_on_image(image.astype(np.float32) / 255.0, resized.astype(np.float32) / 255.0, use_rgb=True)


def explain(predictor: Predictor, sources: Sequence[ImageSource], out: Path, *, layer: str | None = None,
            captions: Sequence[str] | None = None, title: str = "Grad-CAM") -> tuple[Path, list[Prediction]]:
    """Predict ``sources`` and write a grid PNG of their Grad-CAM overlays to ``out``; unreadable sources are
    returned with their error and left out of the picture."""
    decoded = list(predictor.decode_sources(sources))  # one entry per source, in order
    readable = [(source, name, array) for source, (name, array, _) in zip(sources, decoded, strict=True)
                if array is not None]
    predictions = [predictor.failure(name, error) for name, array, error in decoded if array is None]
    if not readable:
        reason = predictions[0].error if predictions else "no inputs"
        raise UsageError(f"none of the {len(decoded)} inputs could be read (e.g. {reason}).")
    batch = np.stack([array for _, _, array in readable])
    results = predictor.classify_arrays(batch, [name for _, name, _ in readable])
    cams = grad_cams(predictor, batch, [int(p.is_crack) for p in results], layer)
    pictures = [overlay(load_resized(source, DISPLAY_SIZE), cam) for (source, _, _), cam in zip(readable, cams,
                                                                                                strict=True)]
    if captions is None:
        captions = [f"{Path(p.source).name}\n{p.label} (p={p.probability:.3f})" for p in results]
    else:
        captions = [c for c, (_, array, _) in zip(captions, decoded, strict=True) if array is not None]
    plot_image_grid(pictures, captions, Path(out), title=title)
    return Path(out), results + predictions


def explain_mistakes(predictor: Predictor, predictions_csv: Path, out: Path, count: int = 16,
                     layer: str | None = None) -> tuple[Path, list[Prediction]]:
    """Grad-CAM grid of the worst mistakes listed in an evaluation's ``predictions.csv``."""
    with open(predictions_csv, newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r.get("correct") == "false"]
    rows.sort(key=lambda r: -abs(float(r["probability"]) - (r["true_label"] == predictor.class_names[1])))
    rows = rows[:count]
    if not rows:
        raise UsageError(f"{predictions_csv}: no mistakes to explain (every readable image was classified correctly).")
    captions = [f"{Path(r['path']).name}\ntrue {r['true_label']}, p(crack)={float(r['probability']):.3f}" for r in rows]
    return explain(predictor, [r["path"] for r in rows], out, layer=layer, captions=captions,
                   title=f"Grad-CAM of the {len(rows)} worst mistakes")

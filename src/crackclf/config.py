"""Checks on the composed training config, run before any data is read, with messages that say the fix."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from crackclf.data.images import IMAGE_EXTENSIONS
from crackclf.models.backbone import BackboneError, check_backbone_name, normalise_pretrained
from crackclf.tracking.mlflow import tracking_uri


class ConfigError(ValueError):
    """A configuration that cannot train; the message names the key and the fix."""


def register_resolvers() -> None:
    """``${tracking_uri:}`` in YAML resolves to the MLflow store (see :mod:`crackclf.tracking.mlflow`)."""
    if not OmegaConf.has_resolver("tracking_uri"):
        OmegaConf.register_new_resolver("tracking_uri", tracking_uri)


register_resolvers()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _number(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{key}={value!r} must be a number.",
    )
    return value


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found; cheap checks first, no data is read."""
    try:
        check_backbone_name(cfg.backbone.name)
        normalise_pretrained(cfg.backbone.get("pretrained", "auto"))
    except BackboneError as error:
        raise ConfigError(str(error)) from None
    freeze = cfg.backbone.get("freeze_epochs", 0) or 0
    _require(isinstance(freeze, int) and freeze >= 0, f"backbone.freeze_epochs={freeze!r} must be an integer >= 0.")

    lr = _number(cfg, "optimizer.lr")
    _require(lr > 0, f"optimizer.lr={lr} must be > 0 (typical: 1e-4 to 1e-1), e.g. optimizer.lr=0.003.")
    weight_decay = cfg.optimizer.get("weight_decay", 0) or 0
    _require(weight_decay >= 0, f"optimizer.weight_decay={weight_decay} must be >= 0.")

    data = cfg.data
    size = _number(cfg, "data.image_size")
    _require(isinstance(size, int) and 16 <= size <= 1024,
             f"data.image_size={size} must be an integer between 16 and 1024 pixels, e.g. data.image_size=64.")
    batch = _number(cfg, "data.batch_size")
    _require(isinstance(batch, int) and batch >= 1, f"data.batch_size={batch} must be an integer >= 1.")
    workers = _number(cfg, "data.num_workers")
    _require(isinstance(workers, int) and workers >= 0, f"data.num_workers={workers} must be an integer >= 0.")
    val, test = _number(cfg, "data.val_fraction"), _number(cfg, "data.test_fraction")
    _require(0 < val < 1, f"data.val_fraction={val} must be between 0 and 1 (exclusive), e.g. 0.15.")
    _require(0 <= test < 1, f"data.test_fraction={test} must be in [0, 1), e.g. 0.15.")
    _require(val + test < 0.9, f"data.val_fraction + data.test_fraction = {val + test} leaves too little to train on.")
    max_per_class = data.get("max_per_class")
    _require(max_per_class is None or (isinstance(max_per_class, int) and max_per_class >= 10),
             f"data.max_per_class={max_per_class!r} must be null (all images) or an integer >= 10.")
    _require(len(data.class_dirs) == 2, f"data.class_dirs={list(data.class_dirs)} must name exactly two folders.")
    if data.get("root") is not None:
        _check_data_folder(Path(str(data.root)), list(data.class_dirs), "data.root")
    if data.get("test_root") is not None:
        _check_data_folder(Path(str(data.test_root)), list(data.class_dirs), "data.test_root")
    if data.get("split_file") is not None:
        _require(Path(data.split_file).is_file(), f"data.split_file={data.split_file} does not exist.")

    epochs = cfg.trainer.get("max_epochs")
    _require(epochs is None or (isinstance(epochs, int) and (epochs >= 1 or epochs == -1)),
             f"trainer.max_epochs={epochs!r} must be an integer >= 1.")
    smoothing = _number(cfg, "model.label_smoothing")
    _require(0 <= smoothing < 0.5, f"model.label_smoothing={smoothing} must be in [0, 0.5).")
    stopping = OmegaConf.select(cfg, "callbacks.early_stopping")
    if stopping is not None:
        patience = stopping.get("patience")
        _require(isinstance(patience, int) and patience >= 0,
                 f"callbacks.early_stopping.patience={patience!r} must be an integer >= 0.")
    threshold = cfg.get("threshold")
    if threshold is not None:
        _require(threshold.mode in ("f1", "recall"), f"threshold.mode={threshold.mode!r} must be 'f1' or 'recall'.")
        _require(0 < threshold.target_recall <= 1, f"threshold.target_recall={threshold.target_recall} must be in (0, 1].")


def _check_data_folder(root: Path, class_dirs: list[str], key: str) -> None:
    _require(root.is_dir(), (
        f"{key}={root} is not a folder. Point {key} at a folder with the sub-folders {class_dirs} "
        "(e.g. the extracted Özgenel data set), or leave data.root unset to download it."
    ))
    for class_dir in class_dirs:
        folder = root / class_dir
        _require(folder.is_dir(), (
            f"{key}={root} has no sub-folder {class_dir!r} (found: {sorted(p.name for p in root.iterdir())[:10]}). "
            f"Set data.class_dirs to the two class folder names, negative class first."
        ))
        has_image = any(
            Path(name).suffix.lower() in IMAGE_EXTENSIONS for _, _, names in os.walk(folder) for name in names
        )
        _require(has_image, f"class folder {folder} contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")

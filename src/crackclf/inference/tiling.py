"""Whole photo → tiles → crack-probability map.

A wall photo is much larger than the crops the model was trained on (227×227 for the Özgenel data). It is cut
into windows of the training crop size *in the photo's pixels* (so a crack appears at the scale the model knows),
every window is classified by the :class:`~crackclf.inference.predictor.Predictor`, and the results form a
per-pixel probability map (each pixel takes the highest probability of the windows covering it). Outputs: an
overlay PNG (heat map over the photo, cracked windows outlined) and a JSON summary (fraction of the photo covered
by cracked windows, bounding boxes of the connected cracked regions, every window's probability).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from scipy import ndimage

from crackclf.data.images import ImageError, ImageSource, describe_source, open_image
from crackclf.errors import UsageError
from crackclf.inference.predictor import Predictor
from crackclf.plots import crack_map_overlay
from crackclf.utils import atomic_write_text

#: Window when the model does not record its training crop size (the Özgenel crops are 227×227).
DEFAULT_WINDOW = 227


@dataclass
class Tile:
    x: int
    y: int
    size: int
    probability: float
    cracked: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclass
class CrackMap:
    """The result of :func:`map_photo`; ``probability`` is per pixel, ``(height, width)`` float32."""

    source: str
    width: int
    height: int
    window: int
    stride: int
    threshold: float
    model_id: str
    tiles: list[Tile]
    probability: np.ndarray = field(repr=False)
    regions: list[tuple[int, int, int, int]] = field(default_factory=list)  # boxes of connected cracked areas

    @property
    def cracked_tiles(self) -> list[Tile]:
        return [t for t in self.tiles if t.cracked]

    @property
    def max_probability(self) -> float:
        return max((t.probability for t in self.tiles), default=0.0)

    @property
    def cracked_fraction(self) -> float:
        """Share of the photo's area covered by at least one cracked window."""
        return float(self.cracked_mask().mean())

    def cracked_mask(self) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        for tile in self.cracked_tiles:
            x0, y0, x1, y1 = tile.box
            mask[y0:y1, x0:x1] = True
        return mask

    def summary(self) -> dict[str, Any]:
        """The JSON summary: sizes, window/stride, cracked fraction, region boxes and every tile."""
        return {
            "source": self.source, "model_id": self.model_id, "width": self.width, "height": self.height,
            "window": self.window, "stride": self.stride, "threshold": self.threshold,
            "tiles": len(self.tiles), "cracked_tiles": len(self.cracked_tiles),
            "cracked_area_fraction": round(self.cracked_fraction, 6), "max_probability": self.max_probability,
            "regions": [{"x0": x0, "y0": y0, "x1": x1, "y1": y1} for x0, y0, x1, y1 in self.regions],
            "tile_results": [{"x": t.x, "y": t.y, "size": t.size, "probability": round(t.probability, 6),
                              "cracked": t.cracked} for t in self.tiles],
        }


def window_of(predictor: Predictor, window: int | None = None) -> int:
    """The tiling window: explicit, else the training crop size stored with the model, else 227."""
    return int(window or predictor.info.tile_size or DEFAULT_WINDOW)


def needs_tiling(width: int, height: int, window: int) -> bool:
    """A photo is tiled when it is larger than one training crop in either direction."""
    return width > window or height > window


def tile_positions(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` pixels, plus one flush with the far edge so nothing is left."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Where the windows of one photo go: ``boxes`` are the top-left corners, row by row."""

    window: int
    stride: int
    boxes: list[tuple[int, int]]


def tile_grid(width: int, height: int, window: int, stride: int | None = None) -> TileGrid:
    """The one tile geometry (``predict --map``, ``/analyze``): the window clipped to the photo's shorter side, the
    stride defaulting to the window (no overlap), and :func:`tile_positions` along both axes."""
    size = min(window, width, height)
    step = int(stride or size)
    if step < 1:
        raise UsageError(f"stride={stride} must be >= 1 pixel.")
    return TileGrid(size, step, [(x, y) for y in tile_positions(height, size, step)
                                 for x in tile_positions(width, size, step)])


def map_photo(predictor: Predictor, source: ImageSource, *, window: int | None = None, stride: int | None = None,
              photo: np.ndarray | None = None, max_tiles: int | None = None) -> CrackMap:
    """Tile one photo and classify every window.

    Args:
        predictor: the predictor (its threshold and TTA setting apply to every window).
        source: the photo (path, bytes, stream); opened with :func:`crackclf.data.images.open_image`.
        window: window side in photo pixels (default: :func:`window_of`); clipped to the photo's shorter side.
        stride: step between windows (default: ``window``, i.e. no overlap; smaller values overlap).
        photo: the already-decoded HWC uint8 photo, if the caller has it.
        max_tiles: refuse (:class:`~crackclf.data.images.ImageError`) a photo that would give more windows, before
            any is classified (a tiny stride on a huge photo would hold a server for minutes).
    """
    if photo is None:
        photo = np.asarray(open_image(source))
    height, width = photo.shape[:2]
    grid = tile_grid(width, height, window_of(predictor, window), stride)
    size, step = grid.window, grid.stride
    if max_tiles is not None and len(grid.boxes) > max_tiles:
        raise ImageError(describe_source(source), f"{width}x{height} with window {size} and stride {step} gives "
                                                  f"{len(grid.boxes):,} windows, more than the limit of "
                                                  f"{max_tiles:,}; use a larger stride.")
    crops = [photo[y : y + size, x : x + size] for x, y in grid.boxes]
    probabilities = predictor.predict_arrays(crops)
    tiles = [Tile(x, y, size, float(p), bool(p >= predictor.threshold))
             for (x, y), p in zip(grid.boxes, probabilities, strict=True)]
    probability = np.zeros((height, width), dtype=np.float32)
    for tile in tiles:
        x0, y0, x1, y1 = tile.box
        np.maximum(probability[y0:y1, x0:x1], tile.probability, out=probability[y0:y1, x0:x1])
    result = CrackMap(describe_source(source), width, height, size, step, predictor.threshold, predictor.model_id,
                      tiles, probability)
    labels, _count = ndimage.label(result.cracked_mask())
    result.regions = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
    return result


def overlay_png(crack_map: CrackMap, photo: np.ndarray, out: Path | BinaryIO) -> Path | BinaryIO:
    """Draw the overlay PNG (heat map over the photo, cracked windows outlined) to a path or a binary stream."""
    return crack_map_overlay(photo, crack_map.probability, [t.box for t in crack_map.cracked_tiles], out)


def write_map(crack_map: CrackMap, photo: np.ndarray, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>_map.png`` (overlay) and ``<stem>_map.json`` (summary) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = overlay_png(crack_map, photo, out_dir / f"{stem}_map.png")
    summary = out_dir / f"{stem}_map.json"
    atomic_write_text(summary, json.dumps(crack_map.summary(), indent=2))
    return png, summary

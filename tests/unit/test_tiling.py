"""Whole-photo tiling: window placement, the probability map, regions and the written overlay/summary (a real
predictor over an untrained network: the geometry does not depend on what the weights say)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from crackclf.bundle import BundleInfo, LoadedModel, build_network
from crackclf.data.images import ImageError
from crackclf.errors import UsageError
from crackclf.inference.predictor import Predictor
from crackclf.inference.tiling import map_photo, needs_tiling, tile_grid, tile_positions, write_map
from crackclf.models.backbone import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    info = BundleInfo("resnet10t", 32, IMAGENET_MEAN, IMAGENET_STD, tile_size=40)
    return LoadedModel(info, "untrained", network=build_network(info).eval())


def photo(rows: int = 3, columns: int = 4, side: int = 40, seed: int = 0) -> np.ndarray:
    """Tiles of clearly different brightness, so that windows get different probabilities."""
    rng = np.random.default_rng(seed)
    tiles = [[np.clip(rng.normal(rng.integers(30, 230), 20, (side, side, 3)), 0, 255) for _ in range(columns)]
             for _ in range(rows)]
    return np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0).astype(np.uint8)


@pytest.mark.parametrize("length, window, stride, expected", [
    (120, 40, 40, [0, 40, 80]), (130, 40, 40, [0, 40, 80, 90]), (30, 40, 40, [0]), (40, 40, 40, [0]),
    (100, 40, 30, [0, 30, 60]), (110, 40, 30, [0, 30, 60, 70]),
])
def test_windows_cover_the_axis_and_end_flush(length, window, stride, expected):
    assert tile_positions(length, window, stride) == expected


def test_only_photos_larger_than_one_crop_are_tiled():
    assert not needs_tiling(227, 227, 227) and needs_tiling(228, 100, 227) and needs_tiling(100, 4032, 227)


def test_map_of_a_mosaic_classifies_each_tile_like_the_predictor(model, tmp_path):
    image = photo()
    predictor = Predictor(model)
    crack_map = map_photo(predictor, "mosaic.png", photo=image)  # window: the bundle's tile_size (40)
    assert (crack_map.window, crack_map.stride, len(crack_map.tiles)) == (40, 40, 12)
    crops = [image[y : y + 40, x : x + 40] for y in (0, 40, 80) for x in (0, 40, 80, 120)]
    expected = predictor.predict_arrays(crops)
    np.testing.assert_allclose([t.probability for t in crack_map.tiles], expected, atol=1e-6)
    # The per-pixel map holds each tile's probability over that tile.
    assert crack_map.probability[45, 125] == pytest.approx(expected[7])

    # Threshold just below the third-highest tile: exactly those three tiles are cracked.
    third = np.sort(expected)[-3]
    chosen = Predictor(model, threshold=float(third))
    cracked = map_photo(chosen, "mosaic.png", photo=image)
    assert sorted(t.probability for t in cracked.cracked_tiles) == pytest.approx(np.sort(expected)[-3:])
    assert cracked.cracked_fraction == pytest.approx(3 / 12)
    covered = np.zeros(image.shape[:2], bool)
    for x0, y0, x1, y1 in cracked.regions:
        covered[y0:y1, x0:x1] = True
    assert (covered >= cracked.cracked_mask()).all() and 1 <= len(cracked.regions) <= 3

    png, summary = write_map(cracked, image, tmp_path, "mosaic")
    assert Image.open(png).size == (160, 120)
    written = json.loads(summary.read_text())
    assert written["cracked_tiles"] == 3 and written["tiles"] == 12 and written["window"] == 40
    assert written["cracked_area_fraction"] == pytest.approx(0.25)


def test_everything_or_nothing_cracked_and_overlapping_windows(model):
    image = photo(2, 3)
    everything = map_photo(Predictor(model, threshold=0.0), "p", photo=image)
    assert everything.cracked_fraction == 1.0 and everything.regions == [(0, 0, 120, 80)]
    nothing = map_photo(Predictor(model, threshold=1.0), "p", photo=image)
    assert nothing.cracked_fraction == 0.0 and nothing.regions == []
    overlapping = map_photo(Predictor(model), "p", photo=image, stride=20)
    assert len(overlapping.tiles) == 5 * 3  # x: 0, 20, 40, 60, 80; y: 0, 20, 40
    # A pixel covered by several windows takes the highest of their probabilities.
    covering = [t.probability for t in overlapping.tiles if t.x <= 50 < t.x + 40 and t.y <= 30 < t.y + 40]
    assert len(covering) == 4 and overlapping.probability[30, 50] == pytest.approx(max(covering))


def test_one_tile_geometry_clips_the_window_and_defaults_the_stride():
    grid = tile_grid(130, 60, 40)  # stride defaults to the window; x ends flush at 90
    assert (grid.window, grid.stride) == (40, 40)
    assert grid.boxes == [(x, y) for y in (0, 20) for x in (0, 40, 80, 90)]
    small = tile_grid(30, 100, 40, stride=25)  # the window is clipped to the shorter side (30)
    assert (small.window, small.stride, small.boxes) == (30, 25, [(0, 0), (0, 25), (0, 50), (0, 70)])
    with pytest.raises(UsageError, match="stride=-1 must be >= 1"):
        tile_grid(100, 100, 40, stride=-1)


def test_a_photo_over_the_window_limit_is_refused_before_any_window_runs(model):
    image = photo(2, 3)  # 120x80, window 40, stride 20: 5 x 3 = 15 windows
    assert len(map_photo(Predictor(model), "p.png", photo=image, stride=20, max_tiles=15).tiles) == 15
    with pytest.raises(ImageError) as refused:
        map_photo(Predictor(model), "p.png", photo=image, stride=20, max_tiles=14)
    assert refused.value.source == "p.png"
    assert refused.value.reason == ("120x80 with window 40 and stride 20 gives 15 windows, more than the limit of "
                                    "14; use a larger stride.")

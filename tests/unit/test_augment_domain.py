"""The domain-generalising transforms: a crack seen smaller (zoom out), another tone curve (gamma), in-camera
sharpening; each does what it says on images built for it."""

from __future__ import annotations

import pytest
import torch

from crackclf.data.augment import BatchAugment

NO_ORIENT = {"hflip": 0, "vflip": 0, "rot90": 0}


def _line_images(count: int = 16, size: int = 48, width: int = 4) -> torch.Tensor:
    """A dark vertical 'crack' ``width`` px wide across a bright flat surface."""
    images = torch.full((count, 3, size, size), 0.8)
    images[..., size // 2 - width // 2: size // 2 + width // 2] = 0.1
    return images


def test_zoom_out_shows_the_crack_thinner_within_the_mirrored_surface():
    torch.manual_seed(0)
    images = _line_images()
    out = BatchAugment(**NO_ORIENT, zoom_out_p=1.0, zoom_out_scale=0.6)(images.clone())
    assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    dark = (out[:, 0] < 0.45).float()  # per pixel: on the crack
    columns = (dark.mean(dim=1) > 0.5).tolist()  # per column: crack (a vertical line stays vertical)
    widths = [len(run) for sample in columns for run in "".join("x" if c else " " for c in sample).split()]
    # Shrunk to a side fraction in [0.6, 1]: 4 px become 2.4-4 px; the mirrored copies in the margin are as thin.
    assert len(widths) >= len(images) and max(widths) <= 4 and sum(widths) / len(widths) < 3.8
    # The samples differ (a scale and a place each), and nothing is black: the margin is surface, not padding.
    assert not torch.equal(out[0], out[1]) and float(out.min()) > 0.05


def test_gamma_moves_mid_tones_and_keeps_black_and_white():
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 11).view(1, 1, 1, 11).expand(32, 3, 4, 11).clone()
    out = BatchAugment(**NO_ORIENT, gamma_p=1.0, gamma=0.5)(ramp.clone())
    assert torch.allclose(out[..., -1], torch.ones(1)) and float(out[..., 0].max()) < 1e-3
    mid = out[:, 0, 0, 5]  # 0.5 ** g with log g in [-0.5, 0.5]: between 0.5 ** 1.65 and 0.5 ** 0.61
    assert float(mid.min()) >= 0.5 ** 1.65 - 1e-4 and float(mid.max()) <= 0.5 ** 0.6 + 1e-4
    assert float(mid.std()) > 0.02  # each sample its own curve
    assert torch.all(out[..., 1:] >= out[..., :-1] - 1e-6)  # monotonic: the order of grey levels is kept


def test_sharpening_raises_edge_contrast_and_keeps_flat_areas():
    torch.manual_seed(0)
    images = _line_images()
    out = BatchAugment(**NO_ORIENT, sharpen_p=1.0, sharpen_amount=1.0)(images.clone())
    assert torch.allclose(out[..., :, :8], images[..., :, :8], atol=1e-6)  # flat surface: unchanged
    edge = slice(24 - 4, 24 + 4)
    assert float((out[..., edge] - images[..., edge]).abs().max()) > 0.05  # halos at the crack's edges
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_the_new_transforms_off_change_nothing():
    images = torch.rand(4, 3, 16, 16)
    off = BatchAugment(**NO_ORIENT, zoom_out_p=0.0, zoom_out_scale=0.7, gamma_p=0.0, gamma=0.3, sharpen_p=0.0)
    assert torch.equal(off(images), images)


@pytest.mark.parametrize(("options", "message"), [({"zoom_out_scale": 0.5}, "zoom_out_scale=0.5 must be in"),
                                                  ({"gamma": -1}, "gamma=-1"), ({"sharpen_p": 2}, "sharpen_p=2")])
def test_bad_values_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        BatchAugment(**options)

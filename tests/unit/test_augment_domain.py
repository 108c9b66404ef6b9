"""The domain-generalising transforms: a crack seen smaller (zoom out), another tone curve (gamma), in-camera
sharpening, straight joints painted across the surface, a surface texture, JPEG re-compression; each does what it
says on images built for it."""

from __future__ import annotations

import pytest
import torch

from crackclf.data.augment import (
    BatchAugment,
    joint_lines,
    paint_cracks,
    paint_joints,
    paint_texture,
    recompress_jpeg,
)

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


def _straight_line_share(changed: torch.Tensor) -> float:
    """The share of ``changed`` pixels (H, W bool) that lie on the straight lines a Hough vote finds: the longest
    lines through the changed pixels (angles in 1-degree steps, offsets in 2 px bins), each kept if it runs at least
    a quarter of the image side through changed pixels (a joint across a corner is short)."""
    size = changed.shape[-1]
    ys, xs = torch.nonzero(changed, as_tuple=True)
    ys, xs = ys.float() - size / 2, xs.float() - size / 2
    angles = torch.deg2rad(torch.arange(0.0, 180.0, 1.0))
    offsets = (xs[:, None] * angles.cos() + ys[:, None] * angles.sin()).div(2).round().long() + size  # (pixels, angles)
    votes = torch.zeros(len(angles), 2 * size + 1)
    votes.scatter_add_(1, offsets.T, torch.ones(offsets.T.shape))
    lines = votes >= size / 4
    on_a_line = lines[torch.arange(len(angles)), offsets].any(dim=1)  # per pixel: one of its bins is a line
    return float(on_a_line.float().mean())


def test_joints_are_straight_lines_across_the_image_on_both_classes():
    """The joints are long straight lines (what tells them from a crack), thin as asked, of one colour, and the
    rest of the image (a crack included) is kept up to the cells' shading."""
    generator = torch.Generator().manual_seed(0)
    size = 96
    surface = torch.full((24, 3, size, size), 0.4)
    surface[12:, :, :, 40:43] = 0.1  # the second half: a dark vertical 'crack' 3 px wide
    out = paint_joints(surface, width=0.05, generator=generator)
    assert out.shape == surface.shape and out.dtype == surface.dtype and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(surface[0], torch.full((3, size, size), 0.4))  # a new tensor: the input is not changed
    # Off the joints a pixel is only shaded (x0.75-1.25): the joints are where a pixel moved more than that.
    ratio = out[:, 0] / surface[:, 0]
    joint = (ratio < 0.74) | (ratio > 1.26) | ((out[:, 0] - out[:, 1]).abs() > 0.02)
    for sample in range(len(out)):
        mask = joint[sample] & (surface[sample, 0] > 0.3)  # the crack's pixels never count as a joint
        if sample >= 12:
            mask[:, 38:45] = False
        share = float(mask.float().mean())
        assert share > 0.005, f"sample {sample}: no visible joint"  # darker or lighter than the surface, always
        assert share <= 0.35, f"sample {sample}: {share:.0%} of the image is joint, not thin lines"
        assert _straight_line_share(mask) > 0.9, f"sample {sample}: the joint pixels are not straight lines"
    crack = out[12:, 0, :, 41]  # the crack's middle column, where no joint crosses it, stays dark
    assert float((crack < 0.2).float().mean()) > 0.8


def test_joints_are_reproducible_and_drawn_per_sample():
    images = torch.rand(8, 3, 32, 32)
    first = paint_joints(images, generator=torch.Generator().manual_seed(1))
    again = paint_joints(images, generator=torch.Generator().manual_seed(1))
    other = paint_joints(images, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    flat = paint_joints(torch.full((8, 3, 32, 32), 0.5), generator=torch.Generator().manual_seed(3))
    assert len({tuple(sample.flatten()[::37].tolist()) for sample in flat}) == 8  # each its own joints


def test_running_bond_offsets_the_cross_joints_of_every_other_course():
    """Angle 0: the first family is vertical lines 32 px apart (the courses, as columns), the second horizontal
    lines 24 px apart. Stacked (a grid), a horizontal joint crosses every course at the same rows; in running bond
    the next course has its joints half a spacing (12 px) further along."""
    size, count = 96, 2
    args = dict(angle=torch.zeros(count), spacing=[torch.full((count,), 32.0), torch.full((count,), 24.0)],
                phase=[torch.zeros(count), torch.zeros(count)], line_width=torch.full((count,), 2.0),
                grid=torch.ones(count, dtype=torch.bool))
    mask, _ = joint_lines(size, size, bond=torch.tensor([False, True]), **args)
    assert float(mask.amin()) >= 0 and float(mask.amax()) <= 1

    def joint_rows(sample: int, column: int) -> list[int]:
        return torch.nonzero(mask[sample, :, column] > 0.5).flatten().tolist()

    # Columns 8 and 40 lie in neighbouring courses (the vertical joints are at x = 48 ± 32 k px).
    assert joint_rows(0, 8) == joint_rows(0, 40)
    stacked, bond_a, bond_b = joint_rows(0, 8), joint_rows(1, 8), joint_rows(1, 40)
    assert bond_a != bond_b and {(row + 12) % 24 for row in bond_a} == {row % 24 for row in bond_b}
    assert stacked and len(bond_a) >= len(stacked) - 2  # the same joints, moved, not removed
    # The vertical joints (the courses' edges) are the same either way.
    assert torch.equal(mask[0, 4] > 0.5, mask[1, 4] > 0.5)


def test_staggered_joints_off_keep_the_default_draws():
    images = torch.rand(16, 3, 32, 32)
    plain = paint_joints(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(plain, paint_joints(images, staggered=0.0, generator=torch.Generator().manual_seed(4)))
    bonded = paint_joints(images, staggered=1.0, generator=torch.Generator().manual_seed(4))
    assert bonded.shape == images.shape and float(bonded.min()) >= 0 and float(bonded.max()) <= 1


def test_joints_in_the_batch_augmentation_touch_the_share_asked():
    torch.manual_seed(0)
    images = torch.full((400, 3, 24, 24), 128, dtype=torch.uint8)
    out = BatchAugment(**NO_ORIENT, joints_p=0.3)(images)
    changed = (out - 128 / 255).abs().flatten(1).amax(dim=1) > 1e-3
    assert 0.2 < float(changed.float().mean()) < 0.4


def test_texture_varies_the_surface_within_its_strength_and_keeps_a_crack_darker():
    images = _line_images(count=32, size=48, width=4)
    out = paint_texture(images, strength=0.2, generator=torch.Generator().manual_seed(0))
    surface, crack = out[..., :, :20], out[..., :, 22:26]
    assert float(surface.std(dim=(1, 2, 3)).max()) > 0.02  # a visible texture on some samples at least
    # Each pixel scaled by 1 + a * t with |t| <= 1, a <= 0.2: the surface stays within 0.8 ± 20 %, the crack darker.
    assert float(surface.min()) >= 0.64 - 1e-5 and float(surface.max()) <= 0.96 + 1e-5
    assert float(crack.max()) < float(surface.min())
    # Grey: the same relative change in every channel of a grey image.
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    again = paint_texture(images, strength=0.2, generator=torch.Generator().manual_seed(0))
    other = paint_texture(images, strength=0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert len({tuple(sample[0, ::7, ::7].flatten().tolist()) for sample in out}) == 32  # each its own texture


def test_jpeg_recompression_loses_more_at_lower_quality():
    torch.manual_seed(0)
    images = _line_images(count=16, size=48, width=3) + torch.rand(16, 3, 48, 48) * 0.1  # a crack on a grainy surface
    low = recompress_jpeg(images, 5, generator=torch.Generator().manual_seed(0))
    high = recompress_jpeg(images, 90, generator=torch.Generator().manual_seed(0))
    assert low.shape == images.shape and low.dtype == images.dtype
    assert float(low.min()) >= 0.0 and float(low.max()) <= 1.0
    error_low, error_high = (low - images).abs().mean(), (high - images).abs().mean()
    assert 0 < error_high < error_low < 0.1  # changed, more at quality 5-95 than at 90-95, and still the picture
    assert float(high[..., 23:25].mean()) < 0.3  # the crack survives compression


def test_synthetic_cracks_are_thin_dark_paths_from_the_border_across_the_image():
    size = 96
    surface = torch.full((24, 3, size, size), 0.7)
    out = paint_cracks(surface, width=2.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == surface.shape and float(out.max()) <= 0.7 + 1e-6  # only ever darker
    assert torch.allclose(out[:, 0], out[:, 1])  # the surface's own colour, darkened: no tint
    for sample in range(len(out)):
        dark = out[sample, 0] < 0.65
        share = float(dark.float().mean())
        assert 0.003 < share < 0.06, f"sample {sample}: {share:.1%} of the image is crack"  # thin, and there
        border = torch.cat([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
        assert bool(border.any()), f"sample {sample}: the crack does not reach the border"
        rows, columns = torch.nonzero(dark, as_tuple=True)
        extent = max(int(rows.max() - rows.min()), int(columns.max() - columns.min()))
        # Most cross the image; a few turn out again early, never as a speck (1,000 draws: 1.6 % < a third of
        # the side, none < 23 px).
        assert extent >= size // 5, f"sample {sample}: a crack {extent} px long only clips the image"
        assert float(out[sample, 0].min()) < 0.7 * 0.75  # darker by a quarter or more at its core
    again = paint_cracks(surface, width=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert len({tuple((sample[0] < 0.65).flatten().nonzero().flatten()[:20].tolist()) for sample in out}) == 24


def test_synthetic_cracks_go_on_crack_free_samples_only_and_relabel_them():
    torch.manual_seed(0)
    images = torch.full((400, 3, 32, 32), 180, dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 200)
    out = BatchAugment(**NO_ORIENT, cracks_p=0.4)(images, labels)
    painted = (out < 170 / 255).flatten(1).any(dim=1)
    assert not bool(painted[1::2].any())  # crack images are left as they are
    assert 0.3 < float(painted[0::2].float().mean()) < 0.5  # the share asked of the crack-free ones
    assert torch.equal(labels.bool(), painted | (torch.arange(400) % 2 == 1))  # painted ⇔ relabelled a crack
    # Without labels (the probe's features, inference) nothing is painted: a label cannot follow.
    assert torch.equal(BatchAugment(**NO_ORIENT, cracks_p=1.0)(images), images.float() / 255)


@pytest.mark.parametrize("option", ["texture_p", "jpeg_p"])
def test_texture_and_jpeg_touch_the_share_asked(option):
    torch.manual_seed(0)
    images = (torch.rand(300, 3, 24, 24) * 255).to(torch.uint8)
    out = BatchAugment(**NO_ORIENT, **{option: 0.3})(images)
    changed = (out - images.float() / 255).abs().flatten(1).amax(dim=1) > 1e-3
    assert 0.2 < float(changed.float().mean()) < 0.4


def test_the_new_transforms_off_change_nothing():
    images = torch.rand(4, 3, 16, 16)
    off = BatchAugment(**NO_ORIENT, zoom_out_p=0.0, zoom_out_scale=0.7, gamma_p=0.0, gamma=0.3, sharpen_p=0.0,
                       joints_p=0.0, joints_width=0.1, texture_p=0.0, texture_strength=0.5, jpeg_p=0.0,
                       jpeg_quality=20)
    assert torch.equal(off(images), images)


@pytest.mark.parametrize(("options", "message"), [({"zoom_out_scale": 0.5}, "zoom_out_scale=0.5 must be in"),
                                                  ({"gamma": -1}, "gamma=-1"), ({"sharpen_p": 2}, "sharpen_p=2"),
                                                  ({"joints_p": -0.1}, "joints_p=-0.1"),
                                                  ({"joints_width": 0.5}, "joints_width=0.5 must be in"),
                                                  ({"joints_staggered": 1.5}, "joints_staggered=1.5"),
                                                  ({"texture_p": 2}, "texture_p=2"),
                                                  ({"texture_strength": 0}, "texture_strength=0 must be in"),
                                                  ({"jpeg_p": -1}, "jpeg_p=-1"),
                                                  ({"jpeg_quality": 0}, "jpeg_quality=0 must be a JPEG quality"),
                                                  ({"cracks_p": 1.5}, "cracks_p=1.5"),
                                                  ({"cracks_width": 0.1}, "cracks_width=0.1 must be in")])
def test_bad_values_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        BatchAugment(**options)


def test_the_training_batches_carry_the_synthetic_cracks_labels(tiny_dataset, tmp_path):
    """Through the data module as a training step gets its batch: the painted crack-free images arrive labelled
    cracks; validation batches are neither painted nor relabelled."""
    from types import SimpleNamespace

    from crackclf.data.datamodule import CrackDataModule

    module = CrackDataModule(str(tiny_dataset), image_size=32, batch_size=8, cache_dir=str(tmp_path / "cache"),
                             progress=False, min_per_class=1, augment=BatchAugment(**NO_ORIENT, cracks_p=1.0))
    images = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 4)
    module.trainer = SimpleNamespace(training=False)
    out, out_labels = module.on_after_batch_transfer((images.clone(), labels.clone()), 0)
    assert torch.equal(out_labels, labels) and torch.equal(out, images.float() / 255)
    module.trainer = SimpleNamespace(training=True)
    out, out_labels = module.on_after_batch_transfer((images.clone(), labels.clone()), 0)
    assert out_labels.tolist() == [1] * 8
    assert bool((out[0::2] < 190 / 255).flatten(1).any(dim=1).all()) and torch.equal(out[1::2], images[1::2] / 255)

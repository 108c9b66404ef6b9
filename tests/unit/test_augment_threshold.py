"""Batch augmentation keeps shapes/ranges and really varies samples; the threshold rule does what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crackclf.data.augment import BatchAugment
from crackclf.metrics import choose_threshold


def test_orientation_only_permutes_pixels():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 16, 16)
    out = BatchAugment(hflip=0.5, vflip=0.5, rot90=0.5)(images.clone())
    # A flip/rotation keeps each image's multiset of pixel values.
    assert torch.allclose(out.flatten(1).sort(dim=1).values, images.flatten(1).sort(dim=1).values)
    assert (out != images).flatten(1).any(dim=1).float().mean() > 0.5


def test_strong_augmentation_changes_samples_independently():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32).repeat(32, 1, 1, 1)
    augment = BatchAugment(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, jitter_p=1.0, crop_scale=0.5,
                           crop_p=1.0, blur_p=0.5, noise_p=0.5, grayscale_p=0.2)
    out = augment(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    distinct = {tuple(np.round(o.flatten()[:20].numpy(), 4)) for o in out}
    assert len(distinct) > 16  # per-sample parameters, not one draw for the whole batch


def test_uint8_and_float_inputs_give_the_same_batch():
    images = torch.randint(0, 256, (32, 3, 24, 24), dtype=torch.uint8)

    def augment(batch: torch.Tensor) -> torch.Tensor:  # the same seed: the same draws for both inputs
        torch.manual_seed(1)
        return BatchAugment(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, jitter_p=0.5, blur_p=0.3,
                            noise_p=0.3)(batch)

    from_uint8, from_float = augment(images), augment(images.float() / 255)
    assert from_uint8.dtype == torch.float32 and from_uint8.shape == images.shape
    assert torch.allclose(from_uint8, from_float, atol=1e-6)


def test_colour_jitter_matches_the_adjustments_applied_one_by_one():
    """The single per-sample colour matrix equals brightness, contrast, saturation and gains applied in turn."""
    images = 0.25 + 0.5 * torch.rand(16, 3, 8, 8)  # mid-range: the clamp to [0, 1] does not interfere
    augment = BatchAugment(hflip=0, vflip=0, rot90=0, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02,
                           jitter_p=1.0)
    draws = []
    original_empty = torch.empty

    def recording_empty(*shape, **kwargs):  # capture the random factors the jitter draws, in order
        tensor = original_empty(*shape, **kwargs)
        draws.append(tensor)
        return tensor

    torch.manual_seed(3)
    torch.empty = recording_empty
    try:
        out = augment(images)
    finally:
        torch.empty = original_empty
    brightness, contrast, saturation, gains = (d.clone() for d in draws[-4:])
    expected = images * brightness.view(-1, 1, 1, 1)
    mean = expected.mean(dim=(1, 2, 3), keepdim=True)
    expected = (expected - mean) * contrast.view(-1, 1, 1, 1) + mean
    grey = expected.mean(dim=1, keepdim=True)
    expected = (expected - grey) * saturation.view(-1, 1, 1, 1) + grey
    expected = (expected * gains.view(-1, 3, 1, 1)).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_blur_and_noise_do_what_they_say():
    flat = torch.full((8, 3, 16, 16), 0.5)
    assert torch.allclose(BatchAugment(0, 0, 0, blur_p=1.0)(flat), flat)  # a blur keeps a flat image
    checker = (torch.arange(16).view(1, 1, 1, 16) + torch.arange(16).view(1, 1, 16, 1)) % 2
    checker = checker.float().expand(8, 3, 16, 16)
    blurred = BatchAugment(0, 0, 0, blur_p=1.0, blur_sigma=1.0)(checker)
    assert blurred.std() < 0.5 * checker.std()
    noisy = BatchAugment(0, 0, 0, noise_p=1.0, noise_std=0.05)(torch.full((64, 3, 32, 32), 0.5))
    assert abs(float((noisy - 0.5).std()) - 0.05) < 0.005 and abs(float((noisy - 0.5).mean())) < 0.005
    windows = [BatchAugment(0, 0, 0, noise_p=1.0)(torch.full((2, 3, 8, 8), 0.5)) for _ in range(2)]
    assert not torch.equal(windows[0], windows[1])  # a fresh noise window every call


def test_disabled_augmentation_is_identity():
    images = torch.rand(4, 3, 8, 8)
    assert torch.equal(BatchAugment(hflip=0, vflip=0, rot90=0)(images), images)


def test_threshold_f1_and_recall_modes():
    labels = np.array([0] * 50 + [1] * 50)
    probabilities = np.concatenate([np.linspace(0.0, 0.45, 50), np.linspace(0.3, 1.0, 50)])
    f1_threshold = choose_threshold(probabilities, labels, "f1")

    def f1(threshold: float) -> float:  # brute force, independent of the implementation
        predicted = probabilities >= threshold
        tp = (predicted & (labels == 1)).sum()
        return 2 * tp / (predicted.sum() + (labels == 1).sum())

    best = max(f1(t) for t in np.unique(probabilities))
    assert np.isclose(f1(f1_threshold), best)
    assert 0.3 <= f1_threshold <= 0.46
    recall_threshold = choose_threshold(probabilities, labels, "recall", target_recall=1.0)
    assert recall_threshold == np.float64(0.3)  # lowest positive: every crack still caught
    assert (probabilities[labels == 1] >= recall_threshold).all()


def test_threshold_balanced_mode_does_not_call_everything_a_crack_when_most_images_are_cracks():
    # 90 cracks and 10 images without, overlapping: F1 gains by calling nearly everything a crack, balanced accuracy
    # (mean of recall and specificity, brute-forced here) does not.
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 90)
    probabilities = np.concatenate([rng.uniform(0.0, 0.7, 10), rng.uniform(0.3, 1.0, 90)])

    def balanced(threshold: float) -> float:
        predicted = probabilities >= threshold
        return (predicted[labels == 1].mean() + (~predicted[labels == 0]).mean()) / 2

    chosen = choose_threshold(probabilities, labels, "balanced")
    assert np.isclose(balanced(chosen), max(balanced(t) for t in np.unique(probabilities)))
    f1_chosen = choose_threshold(probabilities, labels, "f1")
    assert (probabilities[labels == 0] >= f1_chosen).mean() > (probabilities[labels == 0] >= chosen).mean()


def test_metrics_call_a_probability_at_the_threshold_a_crack_like_the_predictor():
    from crackclf.metrics import binary_metrics, confusion_matrix

    # Ties with the threshold, saturated ones at both ends (a threshold of exactly 0 calls a probability of 0 a crack).
    probabilities = np.array([0.0, 0.2, 0.7, 0.7, 1.0, 1.0], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1, 0])
    for threshold in (0.0, 0.7, 1.0, float(np.float32(0.7))):
        metrics, confusion = binary_metrics(probabilities, labels, threshold)
        assert (confusion == confusion_matrix(probabilities, labels, threshold)).all()
        predicted = probabilities >= np.float32(threshold)  # the Predictor's rule (is_crack)
        assert metrics["recall"] == pytest.approx(predicted[labels == 1].mean()), threshold
        assert metrics["acc"] == pytest.approx((predicted == labels.astype(bool)).mean()), threshold


def test_threshold_degenerate_inputs_fall_back_to_half():
    assert choose_threshold(np.array([0.2, 0.9]), np.array([1, 1])) == 0.5
    assert choose_threshold(np.array([]), np.array([])) == 0.5

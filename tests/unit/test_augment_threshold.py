"""Batch augmentation keeps shapes/ranges and really varies samples; the threshold rule does what it says."""

from __future__ import annotations

import numpy as np
import torch

from crackclf.data.augment import BatchAugment
from crackclf.training.threshold import choose_threshold


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


def test_threshold_degenerate_inputs_fall_back_to_half():
    assert choose_threshold(np.array([0.2, 0.9]), np.array([1, 1])) == 0.5
    assert choose_threshold(np.array([]), np.array([])) == 0.5

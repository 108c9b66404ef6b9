"""Batch augmentation on tensors (CPU or GPU), with per-sample random parameters (kornia).

Crack photos have no canonical orientation, so flips and 90° rotations are free; colour, blur, noise, JPEG
quality and scale changes stand in for other cameras, surfaces and lighting.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class BatchAugment(nn.Module):
    """Augment a float batch in [0, 1] of shape (B, 3, H, W); every transform is optional (0 disables it).

    Args:
        hflip, vflip: probability of a horizontal / vertical flip.
        rot90: probability of a random multiple-of-90° rotation.
        brightness, contrast, saturation, hue: colour-jitter strengths; ``jitter_p`` its probability.
        crop_scale: lower bound of the random-resized-crop area (1.0 disables cropping); ``crop_p`` its probability.
        blur_p, blur_sigma: probability and maximum sigma of a Gaussian blur.
        noise_p, noise_std: probability and standard deviation of additive Gaussian noise.
        jpeg_p, jpeg_quality: probability and lowest quality of a (differentiable) JPEG re-encoding.
        grayscale_p: probability of dropping colour.
    """

    def __init__(
        self,
        hflip: float = 0.5,
        vflip: float = 0.5,
        rot90: float = 0.5,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        jitter_p: float = 0.0,
        crop_scale: float = 1.0,
        crop_p: float = 0.0,
        blur_p: float = 0.0,
        blur_sigma: float = 1.0,
        noise_p: float = 0.0,
        noise_std: float = 0.03,
        jpeg_p: float = 0.0,
        jpeg_quality: float = 40.0,
        grayscale_p: float = 0.0,
    ) -> None:
        super().__init__()
        transforms: list[nn.Module] = []
        if hflip > 0:
            transforms.append(K.RandomHorizontalFlip(p=hflip))
        if vflip > 0:
            transforms.append(K.RandomVerticalFlip(p=vflip))
        if rot90 > 0:
            transforms.append(K.RandomRotation90(times=(0, 3), p=rot90))
        if crop_p > 0 and crop_scale < 1.0:
            transforms.append(_LazyResizedCrop(crop_scale, crop_p))
        if jitter_p > 0:
            transforms.append(K.ColorJitter(brightness, contrast, saturation, hue, p=jitter_p))
        if grayscale_p > 0:
            transforms.append(K.RandomGrayscale(p=grayscale_p))
        if blur_p > 0:
            transforms.append(K.RandomGaussianBlur((5, 5), (0.1, blur_sigma), p=blur_p))
        if jpeg_p > 0:
            transforms.append(K.RandomJPEG(jpeg_quality=(jpeg_quality, 100.0), p=jpeg_p))
        if noise_p > 0:
            transforms.append(K.RandomGaussianNoise(std=noise_std, p=noise_p))
        self.transforms = nn.ModuleList(transforms)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            images = transform(images)
        return images.clamp_(0.0, 1.0)

    def __len__(self) -> int:
        return len(self.transforms)


class _LazyResizedCrop(nn.Module):
    """Random resized crop back to the input's own size (known only when the first batch arrives)."""

    def __init__(self, scale: float, p: float) -> None:
        super().__init__()
        self.scale, self.p = scale, p
        self._crops: dict[tuple[int, int], nn.Module] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (images.shape[-2], images.shape[-1])
        if size not in self._crops:
            self._crops[size] = K.RandomResizedCrop(size, scale=(self.scale, 1.0), ratio=(0.8, 1.25), p=self.p)
        return self._crops[size](images)

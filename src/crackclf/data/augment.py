"""Batch augmentation on tensors (CPU or GPU), with per-sample random parameters, fully vectorised.

Crack photos have no canonical orientation, so the 8 flips/rotations of the square are free; colour, blur, noise
and scale changes stand in for other cameras, surfaces and lighting.

Why not kornia: on the 2 shared CPU cores here kornia's per-sample pipeline measured ~200 images/s for the
``strong`` recipe at 64 px, slower than the network it feeds; this vectorised version measured ~1,300 images/s in
the same setting (timings under load; per-transform costs are in docs/data.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align


class BatchAugment(nn.Module):
    """Augment a float batch in [0, 1] of shape (B, 3, H, W); every transform is optional (0 disables it).

    Args:
        hflip, vflip: probability of a horizontal / vertical flip.
        rot90: probability of transposing the image (with the flips this gives all 90° rotations).
        brightness, contrast, saturation: jitter strengths (factor drawn in [1 - s, 1 + s]); ``hue`` shifts the
            colour channels' balance by up to this fraction; ``jitter_p`` is the probability of jittering a sample.
        crop_scale: smallest area fraction of a random resized crop (1.0 disables); ``crop_p`` its probability.
        blur_p, blur_sigma: probability and largest sigma (pixels) of a Gaussian blur.
        noise_p, noise_std: probability and standard deviation of additive Gaussian noise.
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
        grayscale_p: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("hflip", hflip), ("vflip", vflip), ("rot90", rot90), ("jitter_p", jitter_p),
                            ("crop_p", crop_p), ("blur_p", blur_p), ("noise_p", noise_p), ("grayscale_p", grayscale_p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation.{name}={value} must be a probability in [0, 1]")
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"augmentation.crop_scale={crop_scale} must be in (0, 1]")
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.jitter_p, self.crop_scale, self.crop_p = jitter_p, crop_scale, crop_p
        self.blur_p, self.blur_sigma, self.noise_p, self.noise_std = blur_p, blur_sigma, noise_p, noise_std
        self.grayscale_p = grayscale_p

    @property
    def active(self) -> bool:
        return any((self.hflip, self.vflip, self.rot90, self.jitter_p, self.crop_p and self.crop_scale < 1.0,
                    self.blur_p, self.noise_p, self.grayscale_p))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.active or images.shape[0] == 0:
            return images
        images = self._orient(images)
        if self.crop_p > 0 and self.crop_scale < 1.0:
            images = self._resized_crop(images)
        if self.jitter_p > 0:
            images = self._jitter(images)
        if self.grayscale_p > 0:
            gray = images.mean(dim=1, keepdim=True).expand_as(images)
            images = torch.where(self._chance(images, self.grayscale_p), gray, images)
        if self.blur_p > 0:
            images = self._blur(images)
        if self.noise_p > 0:
            noise = torch.randn_like(images) * self.noise_std
            images = images + noise * self._chance(images, self.noise_p)
        return images.clamp_(0.0, 1.0)

    # ------------------------------------------------------------------------------------------------ transforms
    @staticmethod
    def _chance(images: torch.Tensor, p: float) -> torch.Tensor:
        """A (B, 1, 1, 1) boolean mask, True with probability ``p`` per sample."""
        return torch.rand(images.shape[0], 1, 1, 1, device=images.device) < p

    def _orient(self, images: torch.Tensor) -> torch.Tensor:
        if self.rot90 > 0 and images.shape[-1] == images.shape[-2]:
            images = torch.where(self._chance(images, self.rot90), images.transpose(-1, -2), images)
        if self.hflip > 0:
            images = torch.where(self._chance(images, self.hflip), images.flip(-1), images)
        if self.vflip > 0:
            images = torch.where(self._chance(images, self.vflip), images.flip(-2), images)
        return images

    def _resized_crop(self, images: torch.Tensor) -> torch.Tensor:
        chosen = self._subset(images, self.crop_p)
        if chosen.numel() == 0:
            return images
        count, (_, _, height, width) = chosen.numel(), images.shape
        device = images.device
        area = torch.empty(count, device=device).uniform_(self.crop_scale, 1.0)
        ratio = torch.empty(count, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
        crop_w = (area * ratio).sqrt().clamp(max=1.0) * width
        crop_h = (area / ratio).sqrt().clamp(max=1.0) * height
        x0 = torch.rand(count, device=device) * (width - crop_w)
        y0 = torch.rand(count, device=device) * (height - crop_h)
        boxes = torch.stack([torch.arange(count, device=device, dtype=images.dtype), x0, y0, x0 + crop_w,
                             y0 + crop_h], dim=1)
        cropped = roi_align(images[chosen], boxes, (height, width), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        return images.index_copy(0, chosen, cropped)

    @staticmethod
    def _subset(images: torch.Tensor, p: float) -> torch.Tensor:
        """Indices of the samples a transform with probability ``p`` applies to (transforming only those is cheaper)."""
        return torch.nonzero(torch.rand(images.shape[0], device=images.device) < p).flatten()

    def _jitter(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        device = images.device
        apply = self._chance(images, self.jitter_p)

        def factor(strength: float) -> torch.Tensor:
            return torch.empty(batch, 1, 1, 1, device=device).uniform_(1 - strength, 1 + strength)

        out = images
        if self.brightness:
            out = out * factor(self.brightness)
        if self.contrast:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * factor(self.contrast) + mean
        if self.saturation:
            gray = out.mean(dim=1, keepdim=True)
            out = (out - gray) * factor(self.saturation) + gray
        if self.hue:
            # A small per-channel gain change: shifts the colour balance like a camera's white balance.
            gains = torch.empty(batch, 3, 1, 1, device=device).uniform_(1 - self.hue, 1 + self.hue)
            out = out * gains
        return torch.where(apply, out, images)

    def _blur(self, images: torch.Tensor) -> torch.Tensor:
        chosen = self._subset(images, self.blur_p)
        if chosen.numel() == 0:
            return images
        sigma = float(torch.empty(1).uniform_(0.3, self.blur_sigma))
        radius = max(1, int(math.ceil(2 * sigma)))
        offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(images.shape[1], 1, 1, 1)
        padded = F.pad(images[chosen], (radius, radius, radius, radius), mode="reflect")
        blurred = F.conv2d(padded, kernel, groups=images.shape[1])
        blurred = F.conv2d(blurred, kernel.transpose(-1, -2), groups=images.shape[1])
        return images.index_copy(0, chosen, blurred)

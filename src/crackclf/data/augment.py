"""Batch augmentation on tensors (CPU or GPU), with per-sample random parameters, fully vectorised.

Crack photos have no canonical orientation, so the 8 flips/rotations of the square are free; colour, blur, noise
and scale changes stand in for other cameras, surfaces and lighting.

Why not kornia: on the 2 shared CPU cores here kornia's per-sample pipeline measured ~200 images/s for the
``strong`` recipe at 64 px, slower than the network it feeds. This version works on planar (B, 3, H, W) batches, where
flips, transposes and per-channel arithmetic are long contiguous runs, touches only the samples a transform applies
to, and folds the colour jitter into one 3x3 matrix per sample; ``make bench-data --breakdown`` times each
transform (docs/data.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.ops import roi_align

from crackclf.errors import UsageError


class BatchAugment(nn.Module):
    """Augment a batch of shape (B, 3, H, W), uint8 or float in [0, 1]; every transform is optional (0 disables it).

    Args:
        hflip, vflip: probability of a horizontal / vertical flip.
        rot90: probability of transposing the image (with the flips this gives all 90° rotations).
        brightness, contrast, saturation: jitter strengths (factor drawn in [1 - s, 1 + s]); ``hue`` shifts the
            colour channels' balance by up to this fraction; ``jitter_p`` is the probability of jittering a sample.
        crop_scale: smallest area fraction of a random resized crop (1.0 disables); ``crop_p`` its probability.
        zoom_out_p, zoom_out_scale: probability of showing the sample smaller, and the smallest side fraction it is
            shrunk to (the rest of the frame is the surface mirrored at the edges): a crack thinner and shorter than
            any in the data set, as a farther or lower-resolution camera sees it.
        gamma_p, gamma: probability of a gamma curve ``x ** g`` with ``log g`` drawn in [-gamma, gamma] (another
            camera's tone curve: mid-tones move, black and white stay).
        sharpen_p, sharpen_amount: probability and largest amount of an unsharp mask (a camera's in-built sharpening:
            crack edges gain halos).
        blur_p, blur_sigma: probability and largest sigma (pixels) of a Gaussian blur.
        noise_p, noise_std: probability and standard deviation of additive Gaussian noise.
        grayscale_p: probability of dropping colour.
        joints_p, joints_width: probability of painting straight joints across the sample (one family of parallel
            lines, or a grid of two, of one random colour, the cells between them shaded apart), and their largest
            width as a fraction of the side: the tile grout, mortar, formwork and slab joints that other surfaces
            have and this data set does not. Painted on both classes, so a straight joint says nothing about the
            label and a crack beside one is still a crack (:func:`paint_joints`). ``joints_staggered``: the share of
            grids laid in running bond (brick and block walls).
        texture_p, texture_strength: probability of laying a random surface texture over the sample (grain and
            mottling, smooth or blotchy, as asphalt, brick, render and weathered concrete have), and its largest
            relative amplitude (:func:`paint_texture`). On both classes, like the joints.
        jpeg_p, jpeg_quality: probability of re-compressing the sample as a JPEG, at a quality drawn in
            [``jpeg_quality``, 95] (another camera's or a messaging app's compression: blocking and ringing).
        cracks_p, cracks_width: probability that a crack-free sample gets a thin synthetic crack painted across it
            and becomes a crack sample (its label set to 1), and the widest such crack in pixels
            (:func:`paint_cracks`): hairline cracks thinner than any in the data set, as a farther camera or a
            finer crack shows them. Needs the labels (``forward(images, labels)``).
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
        zoom_out_p: float = 0.0,
        zoom_out_scale: float = 1.0,
        gamma_p: float = 0.0,
        gamma: float = 0.0,
        sharpen_p: float = 0.0,
        sharpen_amount: float = 1.0,
        joints_p: float = 0.0,
        joints_width: float = 0.05,
        joints_staggered: float = 0.0,
        texture_p: float = 0.0,
        texture_strength: float = 0.2,
        jpeg_p: float = 0.0,
        jpeg_quality: int = 40,
        cracks_p: float = 0.0,
        cracks_width: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in (("hflip", hflip), ("vflip", vflip), ("rot90", rot90), ("jitter_p", jitter_p),
                            ("crop_p", crop_p), ("blur_p", blur_p), ("noise_p", noise_p), ("grayscale_p", grayscale_p),
                            ("zoom_out_p", zoom_out_p), ("gamma_p", gamma_p), ("sharpen_p", sharpen_p),
                            ("joints_p", joints_p), ("joints_staggered", joints_staggered), ("texture_p", texture_p),
                            ("jpeg_p", jpeg_p), ("cracks_p", cracks_p)):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"augmentation.{name}={value} must be a probability in [0, 1]")
        if not 0.0 < crop_scale <= 1.0:
            raise UsageError(f"augmentation.crop_scale={crop_scale} must be in (0, 1]")
        if not 0.5 < zoom_out_scale <= 1.0:  # the mirrored margin must stay narrower than the image itself
            raise UsageError(f"augmentation.zoom_out_scale={zoom_out_scale} must be in (0.5, 1] (1 disables it)")
        if not 0.0 < joints_width <= 0.25:
            raise UsageError(f"augmentation.joints_width={joints_width} must be in (0, 0.25]: the widest joint as a "
                             "fraction of the image side (e.g. 0.05)")
        if not 0.0 < texture_strength <= 1.0:
            raise UsageError(f"augmentation.texture_strength={texture_strength} must be in (0, 1]: the texture's "
                             "largest relative amplitude (e.g. 0.2)")
        if not 1 <= jpeg_quality <= 95:
            raise UsageError(f"augmentation.jpeg_quality={jpeg_quality} must be a JPEG quality in [1, 95] (the lowest "
                             "drawn; e.g. 40)")
        if not 0.8 <= cracks_width <= 8:
            raise UsageError(f"augmentation.cracks_width={cracks_width} must be in [0.8, 8] pixels: the widest "
                             "synthetic crack (e.g. 2)")
        if gamma < 0 or sharpen_amount < 0:
            raise UsageError(f"augmentation.gamma={gamma} and augmentation.sharpen_amount={sharpen_amount} must be "
                             ">= 0")
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.jitter_p, self.crop_scale, self.crop_p = jitter_p, crop_scale, crop_p
        self.blur_p, self.blur_sigma, self.noise_p, self.noise_std = blur_p, blur_sigma, noise_p, noise_std
        self.grayscale_p = grayscale_p
        self.zoom_out_p, self.zoom_out_scale = zoom_out_p, zoom_out_scale
        self.gamma_p, self.gamma, self.sharpen_p, self.sharpen_amount = gamma_p, gamma, sharpen_p, sharpen_amount
        self.joints_p, self.joints_width, self.joints_staggered = joints_p, joints_width, joints_staggered
        self.texture_p, self.texture_strength, self.jpeg_p, self.jpeg_quality = (texture_p, texture_strength,
                                                                                  jpeg_p, int(jpeg_quality))
        self.cracks_p, self.cracks_width = cracks_p, cracks_width

    @property
    def active(self) -> bool:
        return any((self.hflip, self.vflip, self.rot90, self.jitter_p, self.crop_p and self.crop_scale < 1.0,
                    self.blur_p, self.noise_p, self.grayscale_p, self.zoom_out_p and self.zoom_out_scale < 1.0,
                    self.gamma_p and self.gamma, self.sharpen_p and self.sharpen_amount, self.joints_p,
                    self.texture_p, self.jpeg_p, self.cracks_p))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Augment a (B, 3, H, W) batch, uint8 in [0, 255] or float in [0, 1], into a new float batch in [0, 1].

        ``labels`` (B,), 1 for a crack: needed by ``cracks_p`` only, which sets the painted samples' labels to 1 in
        place; without them no crack is painted."""
        if images.shape[0] == 0 or not self.active:
            return images.float().div_(255.0) if images.dtype == torch.uint8 else images
        # Orientation first, on the input dtype (on uint8 it moves a quarter of the bytes), into a new contiguous
        # tensor that every later transform changes in place, sample subset by sample subset.
        if self.hflip or self.vflip or self.rot90:
            images = self._orient(images)
        elif images.dtype != torch.uint8:
            images = images.clone()
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        if self.crop_p > 0 and self.crop_scale < 1.0:
            self._resized_crop(images)
        if self.zoom_out_p > 0 and self.zoom_out_scale < 1.0:
            self._zoom_out(images)
        if self.joints_p > 0:  # before the colour transforms: the camera sees the joint with the surface
            self._apply(images, self.joints_p, lambda x: paint_joints(x, self.joints_width, self.joints_staggered))
        if self.cracks_p > 0 and labels is not None:  # on the surface, before the camera's colour, blur and noise
            self._paint_cracks(images, labels)
        if self.texture_p > 0:  # the surface's own texture, also seen through the camera's colour and tone
            self._apply(images, self.texture_p, lambda x: paint_texture(x, self.texture_strength))
        if self.jitter_p > 0:
            self._jitter(images)
        if self.gamma_p > 0 and self.gamma > 0:
            self._gamma(images)
        if self.grayscale_p > 0:
            self._apply(images, self.grayscale_p, lambda x: x.mean(dim=1, keepdim=True).expand_as(x))
        if self.blur_p > 0:
            self._blur(images)
        if self.sharpen_p > 0 and self.sharpen_amount > 0:
            self._sharpen(images)
        if self.noise_p > 0:
            self._apply(images, self.noise_p, lambda x: (x + torch.randn_like(x) * self.noise_std).clamp_(0.0, 1.0))
        if self.jpeg_p > 0:  # last, as in a camera: compression comes after the sensor's noise and sharpening
            self._apply(images, self.jpeg_p, lambda x: recompress_jpeg(x, self.jpeg_quality))
        return images

    # ------------------------------------------------------------------------------------------------ transforms
    @staticmethod
    def _subset(images: torch.Tensor, p: float) -> torch.Tensor:
        """Indices of the samples a transform with probability ``p`` applies to (transforming only those is cheaper)."""
        return torch.nonzero(torch.rand(images.shape[0], device=images.device) < p).flatten()

    def _apply(self, images: torch.Tensor, p: float, transform) -> None:
        """Replace, in place, each sample chosen with probability ``p`` by ``transform`` of it."""
        chosen = self._subset(images, p)
        if chosen.numel():
            images.index_copy_(0, chosen, transform(images.index_select(0, chosen)))

    def _paint_cracks(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """A thin crack painted on each crack-free sample chosen with probability ``cracks_p``, labelled a crack."""
        chosen = torch.nonzero((labels == 0) & (torch.rand(len(labels), device=labels.device) < self.cracks_p))
        chosen = chosen.flatten().to(images.device)
        if chosen.numel():
            images.index_copy_(0, chosen, paint_cracks(images.index_select(0, chosen), self.cracks_width))
            labels[chosen.to(labels.device)] = 1

    def _orient(self, images: torch.Tensor) -> torch.Tensor:
        """One of the 8 flips/rotations of the square per sample, into a new contiguous tensor.

        Samples are gathered group by group (one group per flip/rotation), transformed into consecutive rows and
        put back in batch order with one more gather: ``index_select`` runs 10-20x faster on CPU than indexed
        assignment.
        """
        batch, device = images.shape[0], images.device
        square = images.shape[-1] == images.shape[-2]
        transpose = torch.rand(batch, device=device) < (self.rot90 if square else 0.0)
        hflip = torch.rand(batch, device=device) < self.hflip
        vflip = torch.rand(batch, device=device) < self.vflip
        code = transpose.long() * 4 + hflip.long() * 2 + vflip.long()
        order = torch.argsort(code, stable=True)
        counts = torch.bincount(code, minlength=8).tolist()
        grouped = torch.empty(images.shape, dtype=images.dtype, device=device)  # samples sorted by transform
        start = 0
        for value, count in enumerate(counts):
            if count == 0:
                continue
            group = images.index_select(0, order[start:start + count])
            if value & 4:
                group = group.transpose(-1, -2)
            if value & 3:  # flip makes a copy: one call for both axes
                group = group.flip([dim for bit, dim in ((2, -1), (1, -2)) if value & bit])
            grouped[start:start + count].copy_(group)
            start += count
        return grouped.index_select(0, torch.argsort(order))

    def _resized_crop(self, images: torch.Tensor) -> None:
        chosen = self._subset(images, self.crop_p)
        if chosen.numel() == 0:
            return
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
        selected = images.index_select(0, chosen)
        cropped = roi_align(selected, boxes, (height, width), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        images.index_copy_(0, chosen, cropped)

    def _jitter(self, images: torch.Tensor) -> None:
        """Brightness, contrast, saturation and colour balance as one per-sample affine colour map.

        Each of the four is linear in the pixel values, so their composition is ``M @ rgb + b`` with a 3x3 ``M``
        and an offset ``b`` per sample: three multiply-adds instead of a full pass per adjustment.
        """
        chosen = self._subset(images, self.jitter_p)
        count = chosen.numel()
        if count == 0:
            return
        device, dtype = images.device, images.dtype

        def factor(strength: float) -> torch.Tensor:
            return torch.empty(count, device=device, dtype=dtype).uniform_(1 - strength, 1 + strength)

        ones = torch.ones(count, device=device, dtype=dtype)
        brightness = factor(self.brightness) if self.brightness else ones
        contrast = factor(self.contrast) if self.contrast else ones
        saturation = factor(self.saturation) if self.saturation else ones
        # A small per-channel gain change shifts the colour balance like a camera's white balance.
        gains = (torch.empty(count, 3, device=device, dtype=dtype).uniform_(1 - self.hue, 1 + self.hue)
                 if self.hue else torch.ones(count, 3, device=device, dtype=dtype))
        selected = images.index_select(0, chosen)
        mean = selected.mean(dim=(1, 2, 3))  # contrast pivots on the (brightened) sample's mean grey level
        eye = torch.eye(3, device=device, dtype=dtype)
        mix = saturation[:, None, None] * eye + ((1 - saturation) / 3)[:, None, None]  # towards the grey value
        matrix = gains[:, :, None] * mix * (contrast * brightness)[:, None, None]  # (count, out rgb, in rgb)
        offset = gains * ((1 - contrast) * brightness * mean)[:, None]
        mapped = offset[:, :, None, None] + matrix[:, :, 0, None, None] * selected[:, 0:1]
        mapped.addcmul_(matrix[:, :, 1, None, None], selected[:, 1:2])
        mapped.addcmul_(matrix[:, :, 2, None, None], selected[:, 2:3])
        images.index_copy_(0, chosen, mapped.clamp_(0.0, 1.0))

    def _blur(self, images: torch.Tensor) -> None:
        chosen = self._subset(images, self.blur_p)
        if chosen.numel() == 0:
            return
        sigma = float(torch.empty(1).uniform_(0.3, self.blur_sigma))
        images.index_copy_(0, chosen, _gaussian_blur(images.index_select(0, chosen), sigma))

    def _sharpen(self, images: torch.Tensor) -> None:
        """Unsharp mask: the sample plus a per-sample share of its difference from a slightly blurred copy."""
        chosen = self._subset(images, self.sharpen_p)
        if chosen.numel() == 0:
            return
        selected = images.index_select(0, chosen)
        amount = torch.empty(chosen.numel(), 1, 1, 1, device=images.device, dtype=images.dtype)
        amount.uniform_(0.0, self.sharpen_amount)
        detail = selected - _gaussian_blur(selected, 1.0)
        images.index_copy_(0, chosen, selected.addcmul_(detail, amount).clamp_(0.0, 1.0))

    def _gamma(self, images: torch.Tensor) -> None:
        chosen = self._subset(images, self.gamma_p)
        if chosen.numel() == 0:
            return
        exponent = torch.empty(chosen.numel(), 1, 1, 1, device=images.device, dtype=images.dtype)
        exponent.uniform_(-self.gamma, self.gamma).exp_()
        images.index_copy_(0, chosen, images.index_select(0, chosen).clamp_(min=1e-6).pow_(exponent))

    def _zoom_out(self, images: torch.Tensor) -> None:
        """Shrink the chosen samples to a side fraction in [``zoom_out_scale``, 1] at a random place in the frame,
        the margin filled with the surface mirrored at the edges: one ``roi_align`` over a reflect-padded batch,
        whose boxes (one per sample) are larger than the image."""
        chosen = self._subset(images, self.zoom_out_p)
        if chosen.numel() == 0:
            return
        count, (_, _, height, width) = chosen.numel(), images.shape
        device = images.device
        pad_y = int(math.ceil(height * (1 / self.zoom_out_scale - 1)))
        pad_x = int(math.ceil(width * (1 / self.zoom_out_scale - 1)))
        padded = F.pad(images.index_select(0, chosen), (pad_x, pad_x, pad_y, pad_y), mode="reflect")
        scale = torch.empty(count, device=device).uniform_(self.zoom_out_scale, 1.0)
        box_w, box_h = width / scale, height / scale  # the box the whole frame shows, in original pixels
        x0 = pad_x - torch.rand(count, device=device) * (box_w - width)
        y0 = pad_y - torch.rand(count, device=device) * (box_h - height)
        boxes = torch.stack([torch.arange(count, device=device, dtype=images.dtype), x0, y0, x0 + box_w,
                             y0 + box_h], dim=1)
        # sampling_ratio 0: as many samples per output pixel as the box is larger (an average, no aliasing)
        shrunk = roi_align(padded, boxes, (height, width), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        images.index_copy_(0, chosen, shrunk)


def paint_joints(images: torch.Tensor, width: float = 0.05, staggered: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` (B, 3, H, W, float in [0, 1]) with straight joints painted across each: a new tensor.

    Per sample: one family of parallel lines at a random angle, spaced 0.3-1 of the side apart (one to three
    lines in view), and with probability 1/2 a second family at right angles (a grid of tiles, bricks or panels);
    widths from 1 px to ``width`` of the side, anti-aliased; one colour per sample, darker (a gap, dark grout) or
    lighter (white grout, mortar) than the sample's mean grey; the cells between the lines shaded apart by up to
    ±25 % (neighbouring tiles or planks differ). ``staggered``: the share of grids laid in running bond, as brick
    and block walls are (the cross joints of each course offset by half a brick from the course before).
    ``generator``: for reproducible draws (tests, benchmarks).
    """
    count, _, height, width_px = images.shape
    device = images.device

    def uniform(*shape: int) -> torch.Tensor:  # a few numbers a sample: drawn on the CPU, wherever the images are
        return torch.rand(*shape, generator=generator).to(device)

    side = float(min(height, width_px))
    line_width = 1.0 + uniform(count) * max(width * side - 1.0, 0.0)
    angle = uniform(count) * math.pi
    grid = uniform(count) < 0.5
    # Drawn only when asked, so that the other draws (and so the default's augmentation) stay as they were.
    bond = (grid & (uniform(count) < staggered)) if staggered > 0 else torch.zeros_like(grid)
    spacing, phase = [], []
    for _ in range(2):
        spacing.append(side * (0.3 + 0.7 * uniform(count)))  # at most the side: a line always in view
        phase.append(uniform(count))
    mask, cell = joint_lines(height, width_px, angle, spacing, phase, line_width, grid, bond)
    odd = torch.remainder(cell, 2)[:, None]  # a chequerboard of cells
    shade = 1.0 + (uniform(count) * 2 - 1) * 0.25
    shaded = images * (1.0 + odd * (shade[:, None, None, None] - 1.0))
    # Darker than the surface (a gap, dark grout: the look of a crack) or lighter (white grout, mortar), never
    # the surface's own grey, with a slight tint.
    grey = images.mean(dim=(1, 2, 3))
    dark = uniform(count) < 0.6
    level = torch.where(dark, grey * (0.1 + 0.5 * uniform(count)), grey + (1.0 - grey) * (0.4 + 0.6 * uniform(count)))
    colour = (level[:, None] + (uniform(count, 3) - 0.5) * 0.1).clamp_(0.0, 1.0)[:, :, None, None]
    alpha = (0.7 + 0.3 * uniform(count))[:, None, None, None] * mask[:, None]  # mostly opaque
    return (shaded * (1.0 - alpha) + alpha * colour).clamp_(0.0, 1.0).to(images.dtype)


def joint_lines(height: int, width: int, angle: torch.Tensor, spacing: list[torch.Tensor], phase: list[torch.Tensor],
                line_width: torch.Tensor, grid: torch.Tensor, bond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the joints of :func:`paint_joints` lie, from their per-sample (B,) parameters: ``angle`` of the first
    family (radians; the second is at right angles), ``spacing`` (px) and ``phase`` (a fraction of the spacing) of
    each family, ``line_width`` (px), ``grid`` (bool: the second family drawn) and ``bond`` (bool: running bond).

    Returns the joints' coverage (B, H, W) in [0, 1], anti-aliased, and each pixel's cell number (B, H, W), the sum
    of its line numbers in the two families (odd and even cells alternate like a chequerboard).
    """
    device = angle.device
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    mask = torch.zeros(len(angle), height, width, device=device)
    cell = torch.zeros(len(angle), height, width, device=device)
    course = cell  # the first family's line number at each pixel (a course of bricks), set in its turn
    for family in range(2):
        theta = angle + family * math.pi / 2
        period = spacing[family][:, None, None]
        along = (xx * theta.cos()[:, None, None] + yy * theta.sin()[:, None, None]
                 - phase[family][:, None, None] * period)  # signed offset
        if family == 1:  # running bond: every other course's cross joints moved by half their spacing
            along = along + torch.remainder(course, 2) * bond[:, None, None] * period / 2
        distance = (torch.remainder(along + period / 2, period) - period / 2).abs()  # to the nearest line
        line = (line_width[:, None, None] / 2 + 0.5 - distance).clamp_(0.0, 1.0)
        index = torch.floor(along / period)
        if family == 0:
            course = index
        else:
            line, index = line * grid[:, None, None], index * grid[:, None, None]
        mask = torch.maximum(mask, line)
        cell += index
    return mask, cell


def paint_texture(images: torch.Tensor, strength: float = 0.2,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` (B, 3, H, W, float in [0, 1]) with a random surface texture laid over each: a new tensor.

    The texture is grey, zero-mean noise at two grain sizes, a fine grain (1-3 px) and a coarse mottle (4-16 px; one
    pair of sizes per call), mixed per sample and passed through ``tanh`` at a per-sample steepness: smooth
    (render, weathered concrete) to blotchy (aggregate in asphalt, brick's grain). It scales each pixel by
    ``1 + a * texture`` (``|texture| < 1``) with ``a`` drawn in [0, ``strength``] per sample, so a dark crack stays
    darker than the surface around it. ``generator``: for reproducible draws (tests, benchmarks).
    """
    count, _, height, width = images.shape
    device = images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    def noise_field(grain: float) -> torch.Tensor:
        """Unit-variance noise with features ``grain`` pixels across: drawn coarse, interpolated to the image."""
        coarse = torch.randn(count, 1, max(2, round(height / grain)), max(2, round(width / grain)),
                             generator=generator).to(device)
        field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        return field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)

    fine, mottle = noise_field(1.0 + 2.0 * float(uniform(1))), noise_field(4.0 + 12.0 * float(uniform(1)))
    mix = uniform(count)[:, None, None, None]
    steepness = (0.7 + 1.3 * uniform(count))[:, None, None, None]
    texture = torch.tanh(steepness * (mix * fine + (1.0 - mix) * mottle))  # in (-1, 1)
    amplitude = (strength * uniform(count))[:, None, None, None]
    return (images * (1.0 + amplitude * texture)).clamp_(0.0, 1.0).to(images.dtype)


def paint_cracks(images: torch.Tensor, width: float = 2.0, segments: int = 16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` (B, 3, H, W, float in [0, 1]) with one thin synthetic crack painted across each: a new tensor.

    A crack is a jagged path: it enters at a random point of the border (not near a corner) heading into the
    image (within ±30° of straight in), then takes
    ``segments`` steps of a twelfth of the side, each turning by up to ±35° from the last and pulled back towards
    its first heading (cracks wander, they do not curl); 0.8 px to ``width`` px wide, each step a little narrower or
    wider (0.6-1x), anti-aliased; darker than the surface by 40-80 % (a gap in the surface's own colour, not a
    painted line of one colour). ``generator``: for reproducible draws (tests, benchmarks).
    """
    count, _, height, width_px = images.shape
    device = images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    side = float(min(height, width_px))
    # The start: a point on one of the four sides, heading inwards within ±30° of the side's normal (a crack that
    # only clips a corner would be a crack label on a crack-free view).
    edge = torch.randint(0, 4, (count,), generator=generator)
    along = 0.2 + 0.6 * uniform(count)  # away from the corners, where the next side is near
    start_x = torch.where(edge == 0, 0.0, torch.where(edge == 1, float(width_px), along * width_px))
    start_y = torch.where(edge < 2, along * height, torch.where(edge == 2, 0.0, float(height)))
    normal = torch.tensor([0.0, math.pi, math.pi / 2, -math.pi / 2])[edge]
    heading0 = normal + (uniform(count) - 0.5) * (math.pi / 3)
    step = side / 12
    turns = (uniform(count, segments) - 0.5) * math.radians(70)
    headings, heading = [], heading0
    for index in range(segments):
        heading = heading + turns[:, index]
        heading = heading0 + 0.7 * (heading - heading0)  # pulled back towards the first heading
        headings.append(heading)
    angles = torch.stack(headings, dim=1)
    xs = torch.cat([start_x[:, None], start_x[:, None] + torch.cumsum(step * angles.cos(), dim=1)], dim=1)
    ys = torch.cat([start_y[:, None], start_y[:, None] + torch.cumsum(step * angles.sin(), dim=1)], dim=1)
    widths = (0.8 + (width - 0.8) * uniform(count))[:, None] * (0.6 + 0.4 * uniform(count, segments))
    # The distance of every pixel centre to each segment, (B, segments, H, W): the nearest segment paints it.
    px = (torch.arange(width_px, dtype=torch.float32) + 0.5)[None, None, None, :]
    py = (torch.arange(height, dtype=torch.float32) + 0.5)[None, None, :, None]
    x0, y0 = xs[:, :-1, None, None], ys[:, :-1, None, None]
    dx, dy = (xs[:, 1:] - xs[:, :-1])[:, :, None, None], (ys[:, 1:] - ys[:, :-1])[:, :, None, None]
    t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0.0, 1.0)
    distance = torch.hypot(px - (x0 + t * dx), py - (y0 + t * dy))
    coverage = (widths[:, :, None, None] / 2 + 0.5 - distance).clamp(0.0, 1.0).amax(dim=1)  # (B, H, W)
    depth = (0.4 + 0.4 * uniform(count))[:, None, None]
    shade = (1.0 - depth * coverage).to(device)[:, None]
    return (images * shade).clamp_(0.0, 1.0).to(images.dtype)


def recompress_jpeg(images: torch.Tensor, lowest_quality: int = 40,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` (B, 3, H, W, float in [0, 1]) encoded as JPEGs and decoded again, each at a quality drawn in
    [``lowest_quality``, 95]: a new tensor (on the images' device; the codec runs on the CPU)."""
    qualities = torch.randint(lowest_quality, 96, (images.shape[0],), generator=generator).tolist()
    pixels = images.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()
    decoded = [decode_jpeg(encode_jpeg(image, quality=quality))
               for image, quality in zip(pixels, qualities, strict=True)]
    return torch.stack(decoded).to(images.device, images.dtype).div_(255.0)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur as shifted sums (a separable kernel of a few taps), which measured several times faster on
    CPU than a depthwise convolution on these small batches."""
    radius = max(1, int(math.ceil(2 * sigma)))
    weights = [math.exp(-(offset**2) / (2 * sigma**2)) for offset in range(-radius, radius + 1)]
    weights = [weight / sum(weights) for weight in weights]
    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = sum(weight * padded[..., tap:tap + height, :] for tap, weight in enumerate(weights))
    return sum(weight * rows[..., tap:tap + width] for tap, weight in enumerate(weights))

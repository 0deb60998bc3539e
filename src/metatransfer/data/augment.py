"""Batched augmentation on tensors: the whole batch is warped and jittered at once, never image by image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.errors import DataError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
# Omniglot and glyphs are dark strokes on white: mostly-white images, so a mean near 1 would push the
# strokes far from zero; (0.5, 0.5) maps [0, 1] to [-1, 1], which trains well for line drawings.
GRAYSCALE_STATS = ((0.5,), (0.5,))
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mini-imagenet": IMAGENET_STATS,
    "tiered-imagenet": IMAGENET_STATS,
    "image-folder": IMAGENET_STATS,
    "fc100": CIFAR100_STATS,
    "cifar-fs": CIFAR100_STATS,
    "omniglot": GRAYSCALE_STATS,
    "glyphs": GRAYSCALE_STATS,
}


def dataset_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] pixel units used to normalise ``dataset``."""
    try:
        return DATASET_STATS[dataset]
    except KeyError:
        raise DataError(
            f"no normalisation statistics for dataset '{dataset}'; known: {', '.join(DATASET_STATS)}"
        ) from None


def _channel_tensor(values: Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    """``values`` as a [1, C, 1, 1] tensor (a single value is repeated over the channels)."""
    t = torch.as_tensor(tuple(values), dtype=torch.float32, device=like.device)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{t.numel()} normalisation values for {channels} channels")
    return t.reshape(1, channels, 1, 1)


def to_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, H, W, C] uint8 -> [B, C, H, W] float32, ``(x / 255 - mean) / std`` per channel."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a [B, H, W, C] uint8 tensor, got {tuple(images.shape)} {images.dtype}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    c = x.shape[1]
    return (x - _channel_tensor(mean, c, x)) / _channel_tensor(std, c, x)


class BatchAugment(nn.Module):
    """Random resized crop + horizontal flip + brightness/contrast/saturation jitter, per sample.

    ``forward(x)``: [B, C, H, W] float -> [B, C, size, size] float. The crop and flip are one affine
    resampling (``affine_grid`` + ``grid_sample``) of the whole batch. Jitter factors are drawn from
    ``[1 - color_jitter, 1 + color_jitter]``; it acts in pixel units when ``mean``/``std`` of the input's
    normalisation are given, else directly on the input values. Pass a ``torch.Generator`` for
    reproducible draws (it must live on the input's device).
    """

    def __init__(
        self,
        size: int,
        channels: int,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip: bool = True,
        color_jitter: float = 0.4,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        if size < 1 or channels not in (1, 3):
            raise ValueError(f"size must be >= 1 and channels 1 or 3, got size={size}, channels={channels}")
        self.size, self.channels, self.flip = int(size), int(channels), bool(flip)
        self.crop_scale, self.crop_ratio, self.color_jitter = (lo, hi), crop_ratio, float(color_jitter)
        self.mean, self.std = mean, std

    def _uniform(
        self, n: int, lo: float, hi: float, x: torch.Tensor, gen: torch.Generator | None
    ) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=x.device) * (hi - lo) + lo

    def crop_flip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample random resized crop (area fraction in ``crop_scale``) and flip. [B,C,H,W] -> [B,C,s,s]."""
        b = x.shape[0]
        area = self._uniform(b, *self.crop_scale, x, generator)
        log_ratio = self._uniform(b, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), x, generator)
        ratio = torch.exp(log_ratio)
        # Crop width/height as fractions of the image (affine_grid's unit square spans [-1, 1]).
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=generator, device=x.device) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, generator=generator, device=x.device) * 2 - 1) * (1 - h)
        sx = w
        if self.flip:
            flips = torch.rand(b, generator=generator, device=x.device) < 0.5
            sx = torch.where(flips, -w, w)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def jitter(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample brightness, contrast and (RGB) saturation factors. [B,C,H,W] -> same shape."""
        if self.color_jitter == 0:
            return x
        b, c = x.shape[:2]
        lo, hi = 1 - self.color_jitter, 1 + self.color_jitter
        mean = _channel_tensor(self.mean, c, x) if self.mean is not None else None
        std = _channel_tensor(self.std, c, x) if self.std is not None else None
        if mean is not None and std is not None:
            x = x * std + mean
        brightness, contrast, saturation = (
            self._uniform(b, lo, hi, x, generator).view(b, 1, 1, 1) for _ in range(3)
        )
        x = x * brightness
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)
        if c == 3:
            gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
                1, keepdim=True
            )
            x = (x - gray) * saturation + gray
        if mean is not None and std is not None:
            x = (x.clamp(0, 1) - mean) / std
        return x

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, H, W], got {tuple(x.shape)}")
        return self.jitter(self.crop_flip(x, generator), generator)

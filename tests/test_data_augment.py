"""Batched augmentation and normalisation."""

from __future__ import annotations

import pytest
import torch

from metatransfer.data.augment import BatchAugment, dataset_stats, to_float
from metatransfer.data.readers import READERS
from metatransfer.errors import DataError


def test_to_float_layout_and_normalisation() -> None:
    x = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    x[..., 1] = 255
    y = to_float(x, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert y.shape == (2, 3, 4, 5) and y.dtype == torch.float32
    assert torch.allclose(y[:, 0], torch.tensor(-1.0)) and torch.allclose(y[:, 1], torch.tensor(2.0))
    assert to_float(x[..., :1], (0.5,), (0.5,)).shape == (2, 1, 4, 5)
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.float(), (0.5,), (0.5,))


def test_every_dataset_has_stats() -> None:
    for name in READERS:
        mean, std = dataset_stats(name)
        assert len(mean) == len(std) == READERS[name].channels
    with pytest.raises(DataError, match="no normalisation statistics"):
        dataset_stats("mnist")


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_augment_shapes_and_reproducibility(channels: int) -> None:
    aug = BatchAugment(size=16, channels=channels)
    x = torch.rand(8, channels, 20, 20)
    a = aug(x, generator=torch.Generator().manual_seed(0))
    b = aug(x, generator=torch.Generator().manual_seed(0))
    c = aug(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == (8, channels, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # per-sample parameters


def test_identity_settings_keep_the_image() -> None:
    aug = BatchAugment(
        size=12, channels=3, crop_scale=(1.0, 1.0), flip=False, color_jitter=0.0, crop_ratio=(1, 1)
    )
    x = torch.rand(4, 3, 12, 12)
    assert torch.allclose(aug(x), x, atol=1e-5)


def test_flip_mirrors_and_jitter_respects_pixel_range() -> None:
    aug = BatchAugment(size=6, channels=1, crop_scale=(1.0, 1.0), crop_ratio=(1, 1), color_jitter=0.0)
    x = torch.arange(36.0).reshape(1, 1, 6, 6).repeat(64, 1, 1, 1)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    flipped = torch.isclose(out, x.flip(-1), atol=1e-4).flatten(1).all(1)
    kept = torch.isclose(out, x, atol=1e-4).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    jitter = BatchAugment(size=8, channels=3, flip=False, color_jitter=0.9, mean=mean, std=std)
    y = jitter(torch.randn(16, 3, 8, 8) * 3)
    pixels = y * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize(
    "kwargs", [{"crop_scale": (0.0, 1.0)}, {"crop_scale": (0.9, 0.5)}, {"color_jitter": 1.5}, {"channels": 2}]
)
def test_invalid_settings(kwargs: dict) -> None:
    args = {"size": 8, "channels": 3, **kwargs}
    with pytest.raises(ValueError):
        BatchAugment(**args)

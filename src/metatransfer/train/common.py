"""Pieces every phase shares: building and saving backbones, seeding, progress, sanity checks."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metatransfer.config import Config
from metatransfer.data.augment import BatchAugment, dataset_stats
from metatransfer.errors import TrainingError, UserError
from metatransfer.models.backbones import create_backbone
from metatransfer.runs import load_weights, save_weights

BACKBONE_FILE = "backbone.safetensors"


@dataclass(frozen=True)
class Preprocess:
    """How raw images become backbone input: resize to `size`, `channels`, then (x/255 - mean) / std."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> str:
        return json.dumps({"size": self.size, "channels": self.channels, "mean": self.mean, "std": self.std})

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        d = json.loads(text)
        return cls(int(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))


def preprocess_for(cfg: Config, channels: int) -> Preprocess:
    mean, std = dataset_stats(cfg.data.dataset)
    if len(mean) != channels:  # grayscale stats for an RGB folder, or the reverse
        mean, std = (tuple(mean) * channels)[:channels], (tuple(std) * channels)[:channels]
    return Preprocess(cfg.data.size, channels, tuple(mean), tuple(std))


def make_augment(cfg: Config, pre: Preprocess, device: torch.device) -> BatchAugment:
    """The batched augmentation of `pretrain.augment` (meta-training reuses it when `meta.augment`)."""
    a = cfg.pretrain.augment
    return BatchAugment(
        size=pre.size,
        channels=pre.channels,
        crop_scale=(a.crop_scale[0], a.crop_scale[1]),
        flip=a.flip,
        color_jitter=a.color_jitter,
        mean=pre.mean,
        std=pre.std,
    ).to(device)


def build_backbone(cfg: Config, in_channels: int) -> nn.Module:
    return create_backbone(cfg.model.backbone, in_channels, **cfg.model.backbone_args)


def save_backbone(path: Path, backbone: nn.Module, cfg: Config, pre: Preprocess, **extra: str) -> None:
    """Backbone weights as safetensors, with what is needed to rebuild and feed it in the metadata."""
    meta = {
        "backbone": cfg.model.backbone,
        "backbone_args": json.dumps(cfg.model.backbone_args),
        "preprocess": pre.to_json(),
        "dataset": cfg.data.dataset,
        **extra,
    }
    save_weights(path, backbone.state_dict(), meta)


def load_backbone(path: Path) -> tuple[nn.Module, Preprocess, dict[str, str]]:
    """Rebuild a backbone saved by `save_backbone`: (module in eval mode, preprocessing, metadata)."""
    tensors, meta = load_weights(path)
    try:
        pre = Preprocess.from_json(meta["preprocess"])
        backbone = create_backbone(meta["backbone"], pre.channels, **json.loads(meta["backbone_args"]))
    except KeyError as exc:
        raise UserError(
            f"{path} lacks metatransfer metadata ({exc.args[0]}); was it written by mtl pretrain?"
        ) from exc
    missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path} does not match backbone {meta['backbone']}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return backbone.eval(), pre, meta


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (dropout and init use them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_finite(loss: torch.Tensor, where: str) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss became {value} at {where}; the last good checkpoint is kept. Lower the learning rate or use precision=fp32"
        )


class Throughput:
    """Items per second over the whole run so far (for progress bars and metrics)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / max(self.elapsed, 1e-9)


def batches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Shuffled index batches over range(n) drawn from `generator` (so an epoch is reproducible alone)."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def float_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in values.items()}

"""Preprocessing records, and building, saving and loading backbones."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from metatransfer.config import Config
from metatransfer.data.augment import dataset_stats
from metatransfer.errors import UserError
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


def float_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in values.items()}

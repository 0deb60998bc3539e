"""How raw images become backbone input, recorded with every model file so it can be fed the same way."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metatransfer.config import ImageSize, check_value
from metatransfer.data.augment import dataset_stats

if TYPE_CHECKING:
    from metatransfer.config import Config


@dataclass(frozen=True)
class Preprocess:
    """Resize to `size` x `size`, convert to `channels` (1 or 3), then (x/255 - mean) / std per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> str:
        return json.dumps({"size": self.size, "channels": self.channels, "mean": self.mean, "std": self.std})

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        """Parse and validate a record written by `to_json`; ValueError saying what is wrong otherwise."""
        d = json.loads(text)
        if not isinstance(d, dict) or set(d) != {"size", "channels", "mean", "std"}:
            raise ValueError("preprocess must be an object with exactly size, channels, mean and std")
        size = check_value(d["size"], ImageSize, "preprocess.size")
        channels = d["channels"]
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"preprocess.channels must be 1 or 3, got {channels!r}"[:120])
        mean, std = _floats(d["mean"], channels, "mean"), _floats(d["std"], channels, "std")
        if not all(s > 0 for s in std):
            raise ValueError("preprocess.std must be positive")
        return cls(size, channels, mean, std)


def _floats(values: Any, n: int, name: str) -> tuple[float, ...]:
    """`n` finite numbers, or ValueError naming `name`."""
    if (
        not isinstance(values, list)
        or len(values) != n
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
    ):
        raise ValueError(f"preprocess.{name} must be {n} finite numbers (one per channel)")
    return tuple(float(v) for v in values)


def preprocess_for(cfg: Config, channels: int) -> Preprocess:
    """The preprocessing of `cfg.data` for images with `channels` channels (the dataset's statistics)."""
    mean, std = dataset_stats(cfg.data.dataset)
    if len(mean) != channels:  # grayscale stats for an RGB folder, or the reverse
        mean, std = (tuple(mean) * channels)[:channels], (tuple(std) * channels)[:channels]
    return Preprocess(cfg.data.size, channels, tuple(mean), tuple(std))

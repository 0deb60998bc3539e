"""tieredImageNet in the per-split folder layout, validated against the published class lists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metatransfer.errors import DataError

from .base import SplitFoldersReader, load_split_list, register_reader


def _tiered_class_check(split_dir: Path, name: str) -> Callable[[list[str]], list[str]]:
    """Validate found class folders against the published tieredImageNet class list of split ``name``."""
    expected = sorted(load_split_list("tiered-imagenet", name)["class_names"])

    def check(found: list[str]) -> list[str]:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing:
            raise DataError(
                f"{split_dir} lacks {len(missing)} of the {len(expected)} tieredImageNet '{name}' classes "
                f"(e.g. {split_dir / missing[0]}); the split is incomplete"
            )
        if extra:
            raise DataError(
                f"{split_dir / extra[0]} is not a tieredImageNet '{name}' class; remove foreign folders "
                "or use the image-folder dataset"
            )
        return expected

    return check


@register_reader
class TieredImageNetReader(SplitFoldersReader):
    name = "tiered-imagenet"
    layout = "ROOT/{train,val,test}/<wnid>/*.{jpg,png} (351/97/160 classes)"
    default_size = 84
    channels = 3

    def class_filter(self, split_dir: Path, name: str) -> Callable[[list[str]], list[str]]:
        return _tiered_class_check(split_dir, name)

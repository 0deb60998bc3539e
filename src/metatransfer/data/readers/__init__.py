"""Dataset readers by name: ``create_reader("omniglot", root, scheme="lake")``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metatransfer.errors import DataError

if TYPE_CHECKING:
    from metatransfer.config import Config

# Importing the reader modules registers them in READERS.
from . import cifar, glyphs, image_folder, mini_imagenet, omniglot, tiered_imagenet  # noqa: F401
from .base import (
    READERS,
    ArraySource,
    FileSource,
    ImageSource,
    Reader,
    SplitSpec,
    ZipMemberSource,
    register_reader,
)

__all__ = [
    "READERS",
    "ArraySource",
    "FileSource",
    "ImageSource",
    "Reader",
    "SplitSpec",
    "ZipMemberSource",
    "create_reader",
    "reader_class",
    "register_reader",
    "resolve_root",
]

# Folder name of each dataset under a shared data root such as ../shared/data.
DEFAULT_SUBDIRS = {
    "omniglot": "omniglot",
    "mini-imagenet": "mini-imagenet",
    "tiered-imagenet": "tiered-imagenet",
    "fc100": "cifar-100",
    "cifar-fs": "cifar-100",
}


def reader_class(name: str) -> type[Reader]:
    """The reader registered as ``name``; DataError listing the known names otherwise."""
    try:
        return READERS[name]
    except KeyError:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(sorted(READERS))}") from None


def create_reader(name: str, root: Path | str | None, **options: Any) -> Reader:
    """An instance of the reader ``name`` over ``root`` (validated: DataError naming a missing root)."""
    return reader_class(name)(root, **options)


def resolve_root(dataset: str, data_root: str | Path) -> Path:
    """The dataset folder for a parent data folder: ``data_root/<dataset's usual folder>`` if that exists
    (e.g. ``../shared/data`` -> ``../shared/data/mini-imagenet``), else ``data_root`` itself.

    For fc100 / cifar-fs a parent that directly holds ``cifar-100-python/`` is returned as is.
    """
    reader_class(dataset)  # unknown names fail here with the list of known ones
    root = Path(data_root).expanduser()
    if dataset in ("fc100", "cifar-fs") and (root / "cifar-100-python").is_dir():
        return root
    sub = DEFAULT_SUBDIRS.get(dataset)
    if sub is not None and (root / sub).is_dir():
        return root / sub
    return root


def with_data_root(cfg: Config, data_root: str | Path) -> Config:
    """`cfg` with `data.root` set to the dataset's folder under the parent `data_root` (see `resolve_root`)."""
    root = resolve_root(cfg.data.dataset, data_root)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))

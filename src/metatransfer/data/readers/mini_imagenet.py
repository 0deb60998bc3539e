"""miniImageNet: the Ravi & Larochelle CSV layout or the per-split folder layout of the original MTL code."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from metatransfer.errors import DataError

from .base import (
    FileSource,
    ImageSource,
    Reader,
    SplitSpec,
    class_folders_split,
    describe_error,
    register_reader,
)

CSV_HEADER = ["filename", "label"]


def read_split_csv(csv_path: Path) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` from a Ravi-style CSV (``filename,label`` rows, optional header)."""
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            f"cannot read {csv_path}: {describe_error(e)}; expected UTF-8 rows 'filename,label'"
        ) from e
    if rows and [c.strip() for c in rows[0]] == CSV_HEADER:
        rows = rows[1:]
    by_label: dict[str, list[str]] = {}
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{csv_path} line {line}: expected 'filename,label', got {','.join(row)[:80]!r}")
        filename, label = row[0].strip(), row[1].strip()
        if os.path.basename(filename) != filename or filename in (".", ".."):
            raise DataError(f"{csv_path} line {line}: {filename!r} must be a file name inside images/")
        by_label.setdefault(label, []).append(filename)
    if not by_label:
        raise DataError(f"{csv_path} lists no images; expected rows 'filename,label'")
    return by_label


def _csv_split(csv_path: Path, images_dir: Path, name: str) -> SplitSpec:
    """A split given by a CSV of file names inside ``images_dir``; classes and files sorted."""
    if not images_dir.is_dir():
        raise DataError(
            f"{csv_path} needs the image folder {images_dir}, which is missing; unzip images.zip there"
        )
    by_label = read_split_csv(csv_path)
    classes = sorted(by_label)
    sources: list[list[ImageSource]] = [
        [FileSource(str(images_dir / f)) for f in sorted(by_label[c])] for c in classes
    ]
    return SplitSpec(name=name, classes=classes, sources=sources, channels=3)


@register_reader
class MiniImageNetReader(Reader):
    name = "mini-imagenet"
    layout = "ROOT/images/*.jpg + ROOT/{train,val,test}.csv (filename,label), or ROOT/{train,val,test}/<wnid>/*.jpg"
    default_size = 84
    channels = 3

    def _csv(self, split: str) -> Path:
        return self.root / f"{split}.csv"

    def splits(self) -> list[str]:
        return [s for s in self.expected_splits if self._csv(s).is_file() or (self.root / s).is_dir()]

    def split(self, name: str) -> SplitSpec:
        self._check_split_name(name)
        if self._csv(name).is_file():
            return _csv_split(self._csv(name), self.root / "images", name)
        if (self.root / name).is_dir():
            return class_folders_split(self.root / name, name, 3)
        raise DataError(
            f"mini-imagenet split '{name}' is not present: no {name}.csv (or {name}/ folder) in {self.root}"
        )

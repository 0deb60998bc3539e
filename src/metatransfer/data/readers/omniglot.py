"""Omniglot (Lake et al., 2015) from the official ``images_background.zip`` / ``images_evaluation.zip``.

The zips are read in place (or their extracted folders, if present). Class names are
``"<Alphabet>/<characterNN>"`` (plus ``"/rot090"`` etc. with rotations). Schemes:

- ``lake``: background (964 characters) -> ``train``, evaluation (659) -> ``test``.
- ``vinyals``: the 1028 / 172 / 423 split of Vinyals et al. (2016), shipped as package data.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from metatransfer.config import OmniglotScheme, choices
from metatransfer.errors import ConfigError, DataError

from .base import (
    ZIP_ERRORS,
    ImageSource,
    Reader,
    SplitSpec,
    ZipMemberSource,
    describe_error,
    image_files,
    list_dir,
    load_split_list,
    register_reader,
    stat_token,
)

GROUPS = ("background", "evaluation")  # the two official archives
SCHEMES = choices(OmniglotScheme)  # for `mtl data check --scheme`, which has no config
LAKE_SPLITS = {"train": "background", "test": "evaluation"}
ROTATION_SUFFIXES = tuple(f"rot{90 * k:03d}" for k in range(4))


def _zip_group(zip_path: Path, group: str) -> dict[str, list[ImageSource]]:
    """``{"Alphabet/characterNN": [sources]}`` from an official archive, without extracting it."""
    token = stat_token(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except ZIP_ERRORS as e:
        raise DataError(
            f"{zip_path} is not a readable zip archive ({describe_error(e)}); download it again"
        ) from e
    classes: dict[str, list[ImageSource]] = {}
    prefix = f"images_{group}/"
    for info in infos:
        parts = info.filename.split("/")
        # Official layout: images_<group>/<Alphabet>/<characterNN>/<id>_<drawer>.png
        if info.is_dir() or len(parts) != 4 or not info.filename.startswith(prefix):
            continue
        if not parts[3].lower().endswith(".png"):
            continue
        src = ZipMemberSource(str(zip_path), info.filename, f"{token}:{info.CRC:08x}")
        classes.setdefault(f"{parts[1]}/{parts[2]}", []).append(src)
    if not classes:
        raise DataError(
            f"{zip_path} holds no {prefix}<Alphabet>/<character>/*.png images; is it the official zip?"
        )
    for sources in classes.values():
        sources.sort(key=lambda s: s.key)
    return classes


def _folder_group(folder: Path) -> dict[str, list[ImageSource]]:
    """``{"Alphabet/characterNN": [sources]}`` from an extracted ``images_<group>`` folder."""
    classes: dict[str, list[ImageSource]] = {}
    for alphabet in list_dir(folder, what="Omniglot"):
        if not alphabet.is_dir():
            continue
        for character in list_dir(Path(alphabet.path), what="alphabet"):
            if character.is_dir():
                classes[f"{alphabet.name}/{character.name}"] = list(
                    image_files(Path(character.path), extensions={".png"})
                )
    if not classes:
        raise DataError(
            f"{folder} holds no <Alphabet>/<character>/*.png images; is it an extracted Omniglot zip?"
        )
    return classes


def _rotated(
    classes: list[str], sources: list[list[ImageSource]]
) -> tuple[list[str], list[list[ImageSource]], list[int]]:
    """Each class four times, as ``<class>/rot000`` .. ``<class>/rot270`` with k = 0..3 quarter turns."""
    names, srcs, rots = [], [], []
    for name, s in zip(classes, sources, strict=True):
        for k, suffix in enumerate(ROTATION_SUFFIXES):
            names.append(f"{name}/{suffix}")
            srcs.append(s)
            rots.append(k)
    return names, srcs, rots


@register_reader
class OmniglotReader(Reader):
    name = "omniglot"
    layout = (
        "ROOT/images_background.zip and ROOT/images_evaluation.zip (official; or their extracted folders)"
    )
    default_size = 28
    channels = 1
    options = frozenset({"scheme", "rotations"})

    def __init__(self, root: Path | str | None, **options: Any) -> None:
        super().__init__(root, **options)
        self.scheme = options.get("scheme") or "vinyals"
        if self.scheme not in SCHEMES:
            raise ConfigError(f"omniglot scheme '{self.scheme}' is unknown; use one of {', '.join(SCHEMES)}")
        self.rotations = bool(options.get("rotations", False))
        self.expected_splits = ("train", "test") if self.scheme == "lake" else ("train", "val", "test")
        self._groups: dict[str, dict[str, list[ImageSource]]] = {}

    def cache_options(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "rot": int(self.rotations)}

    def _group_path(self, group: str) -> Path | None:
        """The extracted folder if present, else the zip, else None."""
        folder = self.root / f"images_{group}"
        if folder.is_dir():
            return folder
        archive = self.root / f"images_{group}.zip"
        return archive if archive.is_file() else None

    def _group(self, group: str) -> dict[str, list[ImageSource]]:
        if group not in self._groups:
            path = self._group_path(group)
            if path is None:
                raise DataError(
                    f"no images_{group}.zip (or images_{group}/ folder) in {self.root}; download it"
                )
            self._groups[group] = _folder_group(path) if path.is_dir() else _zip_group(path, group)
        return self._groups[group]

    def _groups_needed(self, split: str) -> list[str]:
        if self.scheme == "lake":
            return [LAKE_SPLITS[split]]
        listing: dict[str, dict[str, list[str]]] = load_split_list("omniglot-vinyals", split)
        return [g for g in GROUPS if listing.get(g)]

    def splits(self) -> list[str]:
        return [
            s
            for s in self.expected_splits
            if all(self._group_path(g) is not None for g in self._groups_needed(s))
        ]

    def split(self, name: str) -> SplitSpec:
        self._check_split_name(name)
        if self.scheme == "lake":
            group = self._group(LAKE_SPLITS[name])
            classes = sorted(group)
            sources = [group[c] for c in classes]
        else:
            listing = load_split_list("omniglot-vinyals", name)
            wanted: dict[str, str] = {}  # class name -> archive group
            for g in GROUPS:
                for alphabet, characters in listing.get(g, {}).items():
                    wanted.update({f"{alphabet}/{c}": g for c in characters})
            classes = sorted(wanted)
            sources = []
            for c in classes:
                group = self._group(wanted[c])
                if c not in group:
                    raise DataError(
                        f"character {c} of the vinyals '{name}' split is missing from images_{wanted[c]} "
                        f"in {self.root}; the archive is incomplete"
                    )
                sources.append(group[c])
        rotations = None
        if self.rotations:
            classes, sources, rotations = _rotated(classes, sources)
        return SplitSpec(name=name, classes=classes, sources=sources, channels=1, rotations=rotations)

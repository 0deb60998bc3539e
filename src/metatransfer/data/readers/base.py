"""The reader interface shared by every dataset: class lists, per-class image sources, split names.

A reader only *lists* images (cheap: directory listings, CSVs, zip directories, label arrays); the image
store (``metatransfer.data.store``) decodes them once and caches the pixels.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import warnings
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from metatransfer.config import Split, choices
from metatransfer.errors import ConfigError, DataError

SPLIT_NAMES = choices(Split)
# Extensions of the generic image-folder layout (compared lower-case, so ".JPG" counts too).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def describe_error(e: BaseException, limit: int = 160) -> str:
    """An exception's message on one line (messages are quoted inside one-line DataErrors), shortened."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stat_token(path: str | os.PathLike[str]) -> str:
    """A cheap change detector for one file: ``"<size>:<mtime_ns>"``, or ``"missing"`` if it is gone.

    Only ``stat`` is used (no reading), so fingerprinting 50k files stays well under a second.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


class ImageSource(ABC):
    """One image of a dataset: where it comes from and how to get its bytes or pixels."""

    key: str  # human-readable location, used in error messages and in the cache fingerprint

    @abstractmethod
    def load(self) -> bytes | np.ndarray:
        """Encoded file bytes (JPEG/PNG/...) or an already-decoded ``[H, W, C]`` uint8 array.

        Raises ``OSError`` when the file cannot be read; the store reports that as a bad image.
        """

    @abstractmethod
    def stat_fingerprint(self) -> str:
        """A short string that changes when the underlying file changes (size and mtime, no reading)."""


@dataclass(frozen=True)
class FileSource(ImageSource):
    """An image stored as its own file."""

    path: str

    @property
    def key(self) -> str:  # type: ignore[override]
        return self.path

    def load(self) -> bytes:
        return read_regular_file(self.path)

    def stat_fingerprint(self) -> str:
        return stat_token(self.path)


# What zipfile raises for damaged archives: bad magic, bad CRC or zlib stream, unsupported versions or
# compression methods, encryption, truncated headers, undecodable names.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    NotImplementedError,
    RuntimeError,
)

_ZIP_LOCK = threading.Lock()
_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}


def open_zip(path: str) -> zipfile.ZipFile:
    """A shared read-only handle per zip path (ZipFile reads are thread-safe; re-parsing the directory
    of a 20k-member zip for every image would dominate decode time)."""
    with _ZIP_LOCK:
        zf = _OPEN_ZIPS.get(path)
        if zf is None:
            zf = _OPEN_ZIPS[path] = zipfile.ZipFile(path)
        return zf


@dataclass(frozen=True)
class ZipMemberSource(ImageSource):
    """An image stored inside a zip archive, read without extracting."""

    zip_path: str
    member: str
    token: str  # the zip's stat token plus the member's CRC, computed once when listing

    @property
    def key(self) -> str:  # type: ignore[override]
        return f"{self.zip_path}:{self.member}"

    def load(self) -> bytes:
        try:
            return open_zip(self.zip_path).read(self.member)
        except ZIP_ERRORS as e:
            raise OSError(f"cannot read {self.key}: {describe_error(e)}") from e

    def stat_fingerprint(self) -> str:
        return self.token


@dataclass(frozen=True, eq=False)  # eq would compare pixel arrays
class ArraySource(ImageSource):
    """An image that the dataset file already stores decoded (e.g. CIFAR-100 rows)."""

    key: str
    pixels: np.ndarray = field(repr=False)  # [H, W, C] uint8
    token: str

    def load(self) -> np.ndarray:
        return self.pixels

    def stat_fingerprint(self) -> str:
        return self.token


@dataclass(frozen=True)
class SplitSpec:
    """The images of one split, grouped by class.

    ``classes[i]`` is the name of label ``i``; ``sources[i]`` lists its images in a deterministic order;
    ``rotations[i]`` (if given) is the number of 90-degree counter-clockwise turns applied after decoding.
    """

    name: str
    classes: list[str]
    sources: list[list[ImageSource]]
    channels: int
    rotations: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.classes):
            raise ValueError(f"{len(self.classes)} class names but {len(self.sources)} source lists")
        if self.rotations is not None and len(self.rotations) != len(self.classes):
            raise ValueError(f"{len(self.classes)} class names but {len(self.rotations)} rotations")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.sources)


class Reader(ABC):
    """Lists the classes and images of one dataset layout under ``root``."""

    name: ClassVar[str]  # registry name
    layout: ClassVar[str]  # one line: the on-disk layout this reader expects (shown by `mtl datasets`)
    expected_splits: tuple[str, ...] = SPLIT_NAMES  # splits the benchmark defines (may depend on options)
    default_size: ClassVar[int]  # native image side in pixels
    channels: ClassVar[int]
    options: ClassVar[frozenset[str]] = frozenset()  # keyword options this reader accepts
    needs_root: ClassVar[bool] = True

    def __init__(self, root: Path | str | None, **options: Any) -> None:
        unknown = sorted(set(options) - self.options)
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(
                f"dataset '{self.name}' has no option '{unknown[0]}' (it accepts: {accepted}); remove it"
            )
        if root is None:
            if self.needs_root:
                raise DataError(
                    f"dataset '{self.name}' needs a root folder ({self.layout}); pass --data-root (data.root in a config)"
                )
            self.root = Path(".")
        else:
            self.root = Path(root).expanduser().resolve()  # canonical keys: one cache entry from any cwd
            if self.needs_root and not self.root.is_dir():
                raise DataError(
                    f"dataset root {self.root} does not exist or is not a folder; pass the dataset folder with --data-root (data.root in a config)"
                )

    @abstractmethod
    def splits(self) -> list[str]:
        """Names of the splits present under the root, in train/val/test order."""

    @abstractmethod
    def split(self, name: str) -> SplitSpec:
        """The classes and images of split ``name``; DataError naming the missing file if it is absent."""

    def cache_options(self) -> dict[str, Any]:
        """The effective options that change the images (part of the cache file name)."""
        return {}

    def missing_splits(self) -> list[str]:
        """Splits the benchmark defines that are not present here."""
        present = set(self.splits())
        return [s for s in self.expected_splits if s not in present]

    def _check_split_name(self, name: str) -> None:
        """DataError for a split name the benchmark does not define."""
        if name not in self.expected_splits:
            raise DataError(
                f"dataset '{self.name}' has no split '{name}'; choose one of {', '.join(self.expected_splits)}"
            )


class SplitFoldersReader(Reader):
    """A layout whose splits are folders: ``ROOT/<split>/<class>/<image files>``."""

    def splits(self) -> list[str]:
        return [s for s in self.expected_splits if (self.root / s).is_dir()]

    def split(self, name: str) -> SplitSpec:
        self._check_split_name(name)
        split_dir = self.root / name
        if not split_dir.is_dir():
            raise DataError(f"{self.name} split '{name}' is not present: no {split_dir} folder")
        return class_folders_split(
            split_dir, name, self.channels, class_filter=self.class_filter(split_dir, name)
        )

    def class_filter(self, split_dir: Path, name: str) -> Callable[[list[str]], list[str]] | None:
        """Validates/reorders the class folders found in ``split_dir`` (none by default)."""
        return None


R = TypeVar("R", bound=type[Reader])
READERS: dict[str, type[Reader]] = {}


def register_reader(cls: R) -> R:
    """Class decorator: make ``cls`` available to ``create_reader`` under ``cls.name``."""
    if cls.name in READERS:
        raise ValueError(f"reader name '{cls.name}' registered twice")
    READERS[cls.name] = cls
    return cls


def load_split_list(dataset: str, split: str) -> Any:
    """The JSON class list shipped in ``metatransfer/splits/<dataset>/<split>.json``."""
    ref = resources.files("metatransfer").joinpath("splits", dataset, f"{split}.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def list_dir(path: Path, *, what: str) -> list[os.DirEntry[str]]:
    """Entries of folder ``path`` sorted by name (hidden ones skipped); DataError naming it if unreadable."""
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list {what} folder {path}: {e.strerror or describe_error(e)}") from e
    return sorted(entries, key=lambda e: e.name)


def entry_kind(entry: os.DirEntry[str]) -> str:
    """ "dir", "file", "broken" (a symlink loop or a dangling link: reading it names it as a bad image) or
    "other" (a FIFO, socket or device: reading it could block forever)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # ELOOP from a symlink loop
        return "broken"
    return "broken" if entry.is_symlink() else "other"


def image_files(folder: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[FileSource]:
    """Image files directly in ``folder`` (extension match is case-insensitive), sorted by name.

    Non-regular files (FIFOs, sockets, devices) are skipped with a warning naming them; broken links are
    kept, so decoding reports them as bad images by path.
    """
    exts = frozenset(extensions)
    files, skipped = [], []
    for e in list_dir(folder, what="class"):
        if os.path.splitext(e.name)[1].lower() not in exts:
            continue
        kind = entry_kind(e)
        if kind == "other":
            skipped.append(e.path)
        elif kind != "dir":
            files.append(FileSource(e.path))
    if skipped:
        listed = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(
            f"skipping {len(skipped)} non-regular file(s) (FIFO, socket or device): {listed}", stacklevel=2
        )
    return files


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of `path`, which must be a regular file: a FIFO or device raises OSError instead of blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO with no writer would block otherwise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def class_folders_split(
    split_dir: Path,
    name: str,
    channels: int,
    *,
    class_filter: Callable[[list[str]], list[str]] | None = None,
) -> SplitSpec:
    """A split stored as ``split_dir/<class>/<image files>``; classes sorted by folder name.

    ``class_filter`` may validate/reorder the found class names (it receives them sorted).
    """
    class_dirs = {e.name: Path(e.path) for e in list_dir(split_dir, what="split") if entry_kind(e) == "dir"}
    classes = sorted(class_dirs)
    if class_filter is not None:
        classes = class_filter(classes)
    if not classes:
        raise DataError(
            f"split folder {split_dir} holds no class folders; expected {split_dir}/<class>/<images>"
        )
    sources: list[list[ImageSource]] = []
    for c in classes:
        files = image_files(class_dirs[c])
        if not files:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"class folder {class_dirs[c]} holds no images ({exts}); remove it or add images")
        sources.append(list(files))
    return SplitSpec(name=name, classes=classes, sources=sources, channels=channels)


def require_files(paths: Sequence[Path], *, hint: str) -> None:
    """DataError naming the first missing file of ``paths``."""
    for p in paths:
        if not p.exists():
            raise DataError(f"{p} is missing; {hint}")

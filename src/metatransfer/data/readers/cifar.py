"""FC100 and CIFAR-FS, both carved out of the CIFAR-100 "python version" (``cifar-100-python/``).

The official files are pickles; they are read with ``RestrictedUnpickler``, which admits only the
numpy array reconstruction the format needs, so a tampered file cannot run code. Images of the official
train and test files are pooled (600 per class) and then split by the published class lists.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from metatransfer.errors import DataError

from .base import (
    ArraySource,
    ImageSource,
    Reader,
    SplitSpec,
    describe_error,
    load_split_list,
    register_reader,
    stat_token,
)

CIFAR_FILES = ("train", "test")
CIFAR_SIDE = 32
NUM_FINE, NUM_COARSE = 100, 20


def _numpy_reconstruct() -> Any:
    """numpy's ndarray pickle helper, from wherever this numpy version keeps it."""
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")._reconstruct


# (module, name) -> how to resolve it. Nothing else may be loaded from a dataset pickle.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # Python 2 / numpy 1 files (official)
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,  # numpy 2 files
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3 pickles of bytes at protocol <= 2 go through _codecs.encode, a pure data transform.
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR-style file needs (numpy arrays, bytes)."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.path}: only numpy arrays are allowed in "
                "dataset pickles; download the file again from its official source"
            )
        return _ALLOWED[(module, name)]()


def safe_unpickle(path: Path) -> Any:
    """Load a dataset pickle with ``RestrictedUnpickler``; any failure is a DataError naming ``path``."""
    try:
        # Unpickle from memory: a corrupt length field then cannot make file.read() allocate gigabytes.
        return RestrictedUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise many types; all mean "bad file"
        raise DataError(
            f"cannot read {path}: not a valid pickle ({type(e).__name__}: {describe_error(e)}); download it again"
        ) from e


def _field(d: Any, key: str, path: Path) -> Any:
    """``d[key]`` of an unpickled CIFAR dict, whose keys are bytes in the official files."""
    if not isinstance(d, dict):
        raise DataError(f"{path} does not hold a dict; is it a CIFAR-100 python-version file?")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path} has no '{key}' entry; is it a CIFAR-100 python-version file?")


def _names(value: Any, count: int, key: str, path: Path) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) != count
        or not all(isinstance(v, bytes | str) for v in value)
    ):
        raise DataError(f"{path}: '{key}' must be a list of {count} names")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]


def _labels(value: Any, n: int, high: int, key: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: '{key}' is not a list of integers ({describe_error(e)})") from e
    if arr.shape != (n,) or arr.dtype.kind not in "iu" or (n and (arr.min() < 0 or arr.max() >= high)):
        raise DataError(f"{path}: '{key}' must hold {n} integers in 0..{high - 1}")
    return arr.astype(np.int64)


class CifarReader(Reader):
    """Shared reading of ``cifar-100-python/{train,test,meta}``; subclasses choose the classes per split."""

    layout = "ROOT/cifar-100-python/{train,test,meta} (CIFAR-100 python version, extracted tar.gz)"
    default_size = CIFAR_SIDE
    channels = 3

    def __init__(self, root: Path | str | None, **options: Any) -> None:
        super().__init__(root, **options)
        nested = self.root / "cifar-100-python"
        self.folder = nested if nested.is_dir() else self.root
        self._pool: tuple[list[str], list[str], list[list[ImageSource]]] | None = None

    def _missing_file(self) -> Path | None:
        for f in (*CIFAR_FILES, "meta"):
            if not (self.folder / f).is_file():
                return self.folder / f
        return None

    def splits(self) -> list[str]:
        return list(self.expected_splits) if self._missing_file() is None else []

    def _load_pool(self) -> tuple[list[str], list[str], list[list[ImageSource]]]:
        """(fine names, coarse name of each fine class, per fine class its sources from train then test)."""
        if self._pool is not None:
            return self._pool
        missing = self._missing_file()
        if missing is not None:
            raise DataError(f"{missing} is missing; extract cifar-100-python.tar.gz into {self.root}")
        meta_path = self.folder / "meta"
        meta = safe_unpickle(meta_path)
        fine_names = _names(
            _field(meta, "fine_label_names", meta_path), NUM_FINE, "fine_label_names", meta_path
        )
        coarse_names = _names(
            _field(meta, "coarse_label_names", meta_path), NUM_COARSE, "coarse_label_names", meta_path
        )
        coarse_of: list[str | None] = [None] * NUM_FINE
        per_class: list[list[ImageSource]] = [[] for _ in range(NUM_FINE)]
        for fname in CIFAR_FILES:
            path = self.folder / fname
            d = safe_unpickle(path)
            data = _field(d, "data", path)
            if (
                not isinstance(data, np.ndarray)
                or data.dtype != np.uint8
                or data.ndim != 2
                or data.shape[1] != 3072
            ):
                raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
            fine = _labels(_field(d, "fine_labels", path), len(data), NUM_FINE, "fine_labels", path)
            coarse = _labels(_field(d, "coarse_labels", path), len(data), NUM_COARSE, "coarse_labels", path)
            # Rows are channel-planar (R plane, G plane, B plane); the store wants [H, W, C].
            images = np.ascontiguousarray(data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1))
            token = stat_token(path)
            for row, (f, c) in enumerate(zip(fine.tolist(), coarse.tolist(), strict=True)):
                coarse_of[f] = coarse_names[c]
                per_class[f].append(ArraySource(f"{path}#{row}", images[row], token))
        self._pool = (fine_names, [c or "" for c in coarse_of], per_class)
        return self._pool

    @abstractmethod
    def _split_classes(self, name: str, fine_names: list[str], coarse_of: list[str]) -> list[int]:
        """Fine-label ids of split ``name``."""

    def split(self, name: str) -> SplitSpec:
        self._check_split_name(name)
        fine_names, coarse_of, per_class = self._load_pool()
        ids = sorted(self._split_classes(name, fine_names, coarse_of), key=lambda i: fine_names[i])
        for i in ids:
            if not per_class[i]:
                raise DataError(
                    f"{self.folder} holds no images of class '{fine_names[i]}'; the files are incomplete"
                )
        return SplitSpec(
            name=name, classes=[fine_names[i] for i in ids], sources=[per_class[i] for i in ids], channels=3
        )


@register_reader
class FC100Reader(CifarReader):
    """FC100 (Oreshkin et al., 2018): CIFAR-100 split by superclass, 12/4/4 superclasses (60/20/20 classes)."""

    name = "fc100"

    def _split_classes(self, name: str, fine_names: list[str], coarse_of: list[str]) -> list[int]:
        supers = set(load_split_list("fc100", name))
        unknown = sorted(supers - set(coarse_of))
        if unknown:
            raise DataError(
                f"{self.folder / 'meta'} has no superclass '{unknown[0]}' needed by FC100 '{name}'"
            )
        return [i for i, c in enumerate(coarse_of) if c in supers]


@register_reader
class CifarFSReader(CifarReader):
    """CIFAR-FS (Bertinetto et al., 2019): CIFAR-100 classes split 64/16/20 at random."""

    name = "cifar-fs"

    def _split_classes(self, name: str, fine_names: list[str], coarse_of: list[str]) -> list[int]:
        index = {n: i for i, n in enumerate(fine_names)}
        ids = []
        for _superclass, fine in load_split_list("cifar-fs", name):
            if fine not in index:
                raise DataError(f"{self.folder / 'meta'} has no class '{fine}' needed by CIFAR-FS '{name}'")
            ids.append(index[fine])
        return ids

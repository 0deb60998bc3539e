"""FC100 / CIFAR-FS from CIFAR-100 python-version pickles, read only through the restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import cifar_dict, write_cifar100
from metatransfer.config import DataConfig
from metatransfer.data.readers import create_reader
from metatransfer.data.readers.cifar import safe_unpickle
from metatransfer.data.store import open_split
from metatransfer.errors import DataError


@pytest.mark.parametrize(("name", "counts"), [("fc100", [60, 20, 20]), ("cifar-fs", [64, 16, 20])])
def test_class_counts_and_pooled_images(cifar_root: Path, name: str, counts: list[int]) -> None:
    reader = create_reader(name, cifar_root)
    specs = [reader.split(s) for s in reader.splits()]
    assert [len(s.classes) for s in specs] == counts
    assert all(s.classes == sorted(s.classes) for s in specs)
    assert all(len(src) == 3 + 1 for s in specs for src in s.sources)  # train rows then test rows
    all_classes = [c for s in specs for c in s.classes]
    assert len(set(all_classes)) == 100


def test_pixels_are_hwc_from_channel_planes(cifar_root: Path) -> None:
    spec = create_reader("cifar-fs", cifar_root).split("train")
    src = spec.sources[0][0]
    row = int(src.key.rsplit("#", 1)[1])
    data = cifar_dict(3, 1)[b"data"]
    assert isinstance(data, np.ndarray)
    pixels = src.load()
    assert isinstance(pixels, np.ndarray) and pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels[..., 0].ravel(), data[row, :1024])  # red plane first
    assert np.array_equal(pixels[..., 2].ravel(), data[row, 2048:])


def test_fc100_superclasses_are_whole(cifar_root: Path) -> None:
    import json
    from importlib import resources

    supers = json.loads(resources.files("metatransfer").joinpath("splits/fc100/val.json").read_text())
    spec = create_reader("fc100", cifar_root).split("val")
    assert len(supers) == 4 and len(spec.classes) == 20


def test_open_split_decodes_cifar(cifar_root: Path, cache_dir: Path) -> None:
    store = open_split(
        DataConfig(dataset="fc100", root=str(cifar_root), size=32, cache_dir=str(cache_dir)), "test"
    )
    assert store.images.shape == (20 * 4, 32, 32, 3) and store.num_classes == 20


def test_nested_or_direct_folder_and_missing_files(tmp_path: Path, cifar_root: Path) -> None:
    assert create_reader("cifar-fs", cifar_root / "cifar-100-python").splits() == ["train", "val", "test"]
    empty = create_reader("fc100", tmp_path)
    assert empty.splits() == [] and empty.missing_splits() == ["train", "val", "test"]
    with pytest.raises(DataError, match=f"{tmp_path / 'train'} is missing"):
        empty.split("train")


class _Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /tmp/mtl-pwned",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused(tmp_path: Path, protocol: int) -> None:
    root = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    path = root / "cifar-100-python" / "train"
    payload = {b"data": _Exploit(), b"fine_labels": [], b"coarse_labels": []}
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(DataError, match=rf"refusing to unpickle (posix|os)\.system from {path}"):
        create_reader("cifar-fs", root).split("train")
    assert not Path("/tmp/mtl-pwned").exists()


def test_other_globals_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    path.write_bytes(pickle.dumps({b"x": np.float64(1.0)}, protocol=2))  # numpy scalars are not needed
    with pytest.raises(DataError, match="refusing to unpickle numpy"):
        safe_unpickle(path)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2, 3], "does not hold a dict"),
        ({b"fine_labels": []}, "no 'data' entry"),
        (
            {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 1]},
            "uint8 array",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100], b"coarse_labels": [0, 1]},
            "0..99",
        ),
    ],
)
def test_wrong_structure_is_a_data_error(tmp_path: Path, obj: object, match: str) -> None:
    root = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    (root / "cifar-100-python" / "test").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=match):
        create_reader("fc100", root).split("val")


def test_truncated_pickle_is_a_data_error(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    path = root / "cifar-100-python" / "meta"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match=f"cannot read {path}: not a valid pickle"):
        create_reader("fc100", root).split("train")

"""Fuzzing: random and mutated bytes fed to every reader's input format give only documented outcomes.

Documented outcomes: a DataError (one line, naming the file) from the readers; an image that fails to
decode is reported as a bad image by path (never an exception escaping the store).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cifar_dict, image_bytes, write_cifar100
from metatransfer.data.check import check_dataset
from metatransfer.data.readers import create_reader
from metatransfer.errors import DataError

# 50 examples per format keeps `make test` fast; MTL_FUZZ_EXAMPLES=5000 runs a longer campaign.
FUZZ = settings(
    max_examples=int(os.environ.get("MTL_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


@st.composite
def mutated(draw: st.DrawFn, seed_bytes: bytes) -> bytes:
    """``seed_bytes`` with random byte flips, a random truncation point and random junk appended."""
    data = bytearray(seed_bytes)
    for _ in range(draw(st.integers(0, 8))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=32))


def _any_bytes(seed_bytes: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), mutated(seed_bytes))


def _fresh(tmp_path: Path, tag: str) -> Path:
    folder = tmp_path / tag
    if folder.exists():
        for p in sorted(folder.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@FUZZ
@given(data=_any_bytes(image_bytes(0, fmt="JPEG")) | _any_bytes(image_bytes(1, mode="L", fmt="PNG")))
def test_image_bytes_decode_or_are_reported(tmp_path: Path, data: bytes) -> None:
    root = _fresh(tmp_path, "images")
    (root / "train" / "c").mkdir(parents=True)
    (root / "train" / "c" / "x.jpg").write_bytes(data)
    report = check_dataset(
        "image-folder", root, size=8, cache_dir=tmp_path / "cache", workers=1, progress=False
    )
    assert report.splits[0].images + len(report.bad) == 1
    assert all(b.path == str(root / "train" / "c" / "x.jpg") for b in report.bad)


def _csv_seed() -> bytes:
    return b"filename,label\nn0100000000000001.jpg,n01000000\nn0100000000000002.jpg,n01000000\n"


@FUZZ
@given(data=_any_bytes(_csv_seed()))
def test_csv_parses_or_raises_data_error(tmp_path: Path, data: bytes) -> None:
    root = _fresh(tmp_path, "mini")
    (root / "images").mkdir()
    (root / "train.csv").write_bytes(data)
    try:
        spec = create_reader("mini-imagenet", root).split("train")
    except DataError as e:
        assert "\n" not in str(e)
    else:
        assert spec.num_images >= 1 and spec.classes == sorted(spec.classes)


def _zip_seed() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("images_background/Latin/character01/0001_01.png", image_bytes(0, mode="1", fmt="PNG"))
    return buf.getvalue()


@FUZZ
@given(data=_any_bytes(_zip_seed()))
def test_zip_lists_or_raises_data_error(tmp_path: Path, data: bytes) -> None:
    root = _fresh(tmp_path, "omniglot")
    (root / "images_background.zip").write_bytes(data)
    try:
        spec = create_reader("omniglot", root, scheme="lake").split("train")
    except DataError as e:
        assert "\n" not in str(e)
    else:
        for sources in spec.sources:  # a listed member may still be corrupt: that must be an OSError
            for src in sources:
                with contextlib.suppress(OSError):
                    src.load()


def _pickle_seed() -> bytes:
    return pickle.dumps(cifar_dict(1, 0), protocol=2)


@FUZZ
@given(data=_any_bytes(_pickle_seed()[:2048]) | _any_bytes(_pickle_seed()))
def test_cifar_pickle_loads_or_raises_data_error(tmp_path: Path, data: bytes) -> None:
    root = _fresh(tmp_path, "cifar")
    write_cifar100(root, train_per_class=1, test_per_class=1)
    (root / "cifar-100-python" / "train").write_bytes(data)
    try:
        spec = create_reader("cifar-fs", root).split("val")
    except DataError as e:
        assert "\n" not in str(e)
    else:
        assert all(isinstance(s.load(), np.ndarray) for src in spec.sources for s in src)


def test_fuzz_seeds_are_valid_inputs(tmp_path: Path) -> None:
    """The un-mutated seeds parse, so the fuzzers start from the real formats."""
    (tmp_path / "images").mkdir()
    (tmp_path / "train.csv").write_bytes(_csv_seed())
    assert create_reader("mini-imagenet", tmp_path).split("train").num_images == 2
    (tmp_path / "images_background.zip").write_bytes(_zip_seed())
    assert len(create_reader("omniglot", tmp_path, scheme="lake").split("train").classes) == 1
    assert pickle.loads(_pickle_seed())[b"data"].shape == (100, 3072)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about some corrupt files

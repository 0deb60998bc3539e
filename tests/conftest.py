"""Fixture writers: small datasets in the exact on-disk formats their users download.

Each writer produces the real layout (official Omniglot zips, Ravi CSVs, per-split folders, CIFAR-100
python-version pickles) with few, tiny images, so every reader is tested on the format, not on a mock.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def image_bytes(seed: int, size: int = 12, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small random image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int, size: int = 12, mode: str = "RGB") -> Path:
    """A random image at ``path``; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[
        path.suffix.lower()
    ]
    path.write_bytes(image_bytes(seed, size, mode, fmt))
    return path


def split_list(dataset: str, split: str) -> Any:
    """A class list shipped with the package (``metatransfer/splits``)."""
    return json.loads(
        resources.files("metatransfer").joinpath("splits", dataset, f"{split}.json").read_text()
    )


def omniglot_characters() -> dict[str, dict[str, list[str]]]:
    """``{group: {alphabet: [characterNN, ...]}}`` of the whole official release (from the vinyals lists)."""
    full: dict[str, dict[str, list[str]]] = {"background": {}, "evaluation": {}}
    for split in ("train", "val", "test"):
        listing = split_list("omniglot-vinyals", split)
        assert isinstance(listing, dict)
        for group, alphabets in listing.items():
            for alphabet, chars in alphabets.items():
                full[group].setdefault(alphabet, []).extend(chars)
    return full


def write_omniglot(root: Path, drawers: int = 2, *, extracted: bool = False) -> Path:
    """``images_background.zip`` / ``images_evaluation.zip`` with the official member layout
    ``images_<group>/<Alphabet>/<characterNN>/<id>_<drawer>.png``, every character present (1623),
    ``drawers`` tiny 1-bit PNGs each (or the extracted folders when ``extracted``)."""
    root.mkdir(parents=True, exist_ok=True)
    pngs = [image_bytes(d, size=10, mode="1", fmt="PNG") for d in range(drawers)]
    for group, alphabets in omniglot_characters().items():
        members = []
        for alphabet, chars in sorted(alphabets.items()):
            for n, char in enumerate(sorted(chars), start=1):
                for d in range(drawers):
                    members.append((f"images_{group}/{alphabet}/{char}/{n:04d}_{d + 1:02d}.png", pngs[d]))
        if extracted:
            for name, data in members:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
        else:
            with zipfile.ZipFile(root / f"images_{group}.zip", "w", zipfile.ZIP_STORED) as zf:
                for name, data in members:
                    zf.writestr(name, data)
    return root


def write_mini_imagenet_csv(root: Path, splits: dict[str, int], per_class: int = 4) -> Path:
    """Ravi layout: ``images/<wnid><8 digits>.jpg`` and ``<split>.csv`` with a ``filename,label`` header."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    seed = 0
    for s, (split, n_classes) in enumerate(splits.items()):
        rows = ["filename,label"]
        for c in range(n_classes):
            wnid = f"n{s:02d}{c:06d}"
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                write_image(root / "images" / name, seed)
                seed += 1
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_class_folders(split_dir: Path, classes: list[str], per_class: int, ext: str = ".jpg") -> None:
    """``split_dir/<class>/<i><ext>`` random images."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(split_dir / name / f"img{i:03d}{ext}", seed=1000 * c + i)


def cifar_classes() -> tuple[list[str], list[str], dict[str, str]]:
    """Fine names, coarse names (both sorted, as in the official meta) and fine -> coarse."""
    coarse_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for superclass, fine in split_list("cifar-fs", split):
            coarse_of[fine] = superclass
    return sorted(coarse_of), sorted(set(coarse_of.values())), coarse_of


def cifar_dict(per_class: int, seed: int) -> dict[bytes, object]:
    """One CIFAR-100 python-version batch dict, with the official byte-string keys."""
    fine_names, coarse_names, coarse_of = cifar_classes()
    rng = np.random.default_rng(seed)
    fine = [f for f in range(len(fine_names)) for _ in range(per_class)]
    return {
        b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine,
        b"coarse_labels": [coarse_names.index(coarse_of[fine_names[f]]) for f in fine],
        b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
    }


def write_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 1) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` as protocol-2 pickles of the official dict structure."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine_names, coarse_names, _ = cifar_classes()
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    for name, obj in (
        ("meta", meta),
        ("train", cifar_dict(train_per_class, 1)),
        ("test", cifar_dict(test_per_class, 2)),
    ):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar"))


@pytest.fixture()
def mini_csv_root(tmp_path: Path) -> Path:
    return write_mini_imagenet_csv(tmp_path / "mini-imagenet", {"train": 3, "val": 2})


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (see the project README)")
    return SHARED_DATA

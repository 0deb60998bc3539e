"""Readers against fixtures in the real formats, and against the real data when it is present."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import split_list, write_class_folders, write_image, write_omniglot
from metatransfer.data.readers import READERS, create_reader, resolve_root
from metatransfer.data.readers.glyphs import GlyphsReader
from metatransfer.errors import ConfigError, DataError

ALL_NAMES = {"omniglot", "mini-imagenet", "tiered-imagenet", "fc100", "cifar-fs", "image-folder", "glyphs"}


def test_registry_has_every_reader_with_a_layout() -> None:
    assert set(READERS) == ALL_NAMES
    assert all(cls.layout and cls.name == name for name, cls in READERS.items())


def test_unknown_dataset_lists_the_known_names() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*mini-imagenet"):
        create_reader("mnist", ".")


@pytest.mark.parametrize("name", sorted(ALL_NAMES - {"glyphs"}))
def test_missing_root_is_one_line_naming_it(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")) as e:
        create_reader(name, tmp_path / "nope")
    assert "\n" not in str(e.value)


def test_unknown_option_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'scheme'"):
        create_reader("mini-imagenet", tmp_path, scheme="lake")


def test_resolve_root_maps_a_parent_folder(tmp_path: Path) -> None:
    (tmp_path / "mini-imagenet").mkdir()
    (tmp_path / "cifar-100-python").mkdir()
    assert resolve_root("mini-imagenet", tmp_path) == tmp_path / "mini-imagenet"
    assert resolve_root("omniglot", tmp_path) == tmp_path  # no omniglot/ below: taken as the dataset folder
    assert resolve_root("fc100", tmp_path) == tmp_path


# --- Omniglot ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "rotations", "expected"),
    [
        ("vinyals", False, {"train": 1028, "val": 172, "test": 423}),
        ("vinyals", True, {"train": 4112, "val": 688, "test": 1692}),
        ("lake", False, {"train": 964, "test": 659}),
    ],
)
def test_omniglot_zip_class_counts(omniglot_root: Path, scheme: str, rotations: bool, expected: dict) -> None:
    reader = create_reader("omniglot", omniglot_root, scheme=scheme, rotations=rotations)
    assert reader.splits() == list(expected)
    for split, n in expected.items():
        spec = reader.split(split)
        assert len(spec.classes) == n and spec.classes == sorted(spec.classes)
        assert spec.channels == 1 and all(len(s) == 2 for s in spec.sources)
        assert (spec.rotations is not None) == rotations


def test_omniglot_rotated_classes_share_images(omniglot_root: Path) -> None:
    spec = create_reader("omniglot", omniglot_root, rotations=True).split("val")
    assert spec.classes[:4] == [f"{spec.classes[0].rsplit('/', 1)[0]}/rot{d:03d}" for d in (0, 90, 180, 270)]
    assert spec.rotations is not None and spec.rotations[:4] == [0, 1, 2, 3]
    assert spec.sources[0] == spec.sources[3]


def test_omniglot_sources_name_the_zip_member(omniglot_root: Path) -> None:
    spec = create_reader("omniglot", omniglot_root, scheme="lake").split("train")
    key = spec.sources[0][0].key
    assert key.startswith(f"{omniglot_root / 'images_background.zip'}:images_background/")
    data = spec.sources[0][0].load()
    assert isinstance(data, bytes) and data.startswith(b"\x89PNG")


def test_omniglot_extracted_folders(tmp_path: Path) -> None:
    root = write_omniglot(tmp_path, drawers=1, extracted=True)
    spec = create_reader("omniglot", root, scheme="lake").split("test")
    assert len(spec.classes) == 659 and spec.sources[0][0].key.startswith(str(root / "images_evaluation"))


def test_omniglot_missing_zip_and_incomplete_zip(tmp_path: Path, omniglot_root: Path) -> None:
    (tmp_path / "images_background.zip").write_bytes((omniglot_root / "images_background.zip").read_bytes())
    reader = create_reader("omniglot", tmp_path, scheme="lake")
    assert reader.splits() == ["train"] and reader.missing_splits() == ["test"]
    with pytest.raises(DataError, match="no images_evaluation.zip"):
        reader.split("test")
    # An archive that lacks a character of the vinyals list is named as incomplete.
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as zf:
        zf.writestr("images_evaluation/Angelic/character01/0965_01.png", b"x")
    with pytest.raises(DataError, match="missing from images_evaluation"):
        create_reader("omniglot", tmp_path).split("test")


def test_omniglot_not_a_zip_and_bad_scheme(tmp_path: Path) -> None:
    (tmp_path / "images_background.zip").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        create_reader("omniglot", tmp_path, scheme="lake").split("train")
    with pytest.raises(ConfigError, match="scheme 'ravi'"):
        create_reader("omniglot", tmp_path, scheme="ravi")


# --- miniImageNet -------------------------------------------------------------------------------------------


def test_mini_imagenet_csv_layout(mini_csv_root: Path) -> None:
    reader = create_reader("mini-imagenet", mini_csv_root)
    assert reader.splits() == ["train", "val"] and reader.missing_splits() == ["test"]
    spec = reader.split("train")
    assert spec.classes == sorted(spec.classes) and len(spec.classes) == 3
    assert [len(s) for s in spec.sources] == [4, 4, 4] and spec.channels == 3
    with pytest.raises(
        DataError, match=r"split 'test' is not present: no test.csv .* in " + str(mini_csv_root)
    ):
        reader.split("test")
    with pytest.raises(DataError, match="no split 'valid'"):
        reader.split("valid")


def test_mini_imagenet_folder_layout(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "train", ["n02", "n01"], per_class=3)
    write_class_folders(tmp_path / "test", ["n03"], per_class=2)
    reader = create_reader("mini-imagenet", tmp_path)
    assert reader.splits() == ["train", "test"]
    spec = reader.split("train")
    assert spec.classes == ["n01", "n02"] and spec.sources[0][0].key.endswith("n01/img000.jpg")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("filename,label\nonly_one_field\n", "line 2: expected 'filename,label'"),
        ("filename,label\n", "lists no images"),
        ("filename,label\n../escape.jpg,n01\n", "must be a file name inside images/"),
    ],
)
def test_mini_imagenet_bad_csv(mini_csv_root: Path, content: str, match: str) -> None:
    (mini_csv_root / "val.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        create_reader("mini-imagenet", mini_csv_root).split("val")


def test_mini_imagenet_csv_without_images_folder(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("filename,label\na.jpg,n01\n")
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'images'}"):
        create_reader("mini-imagenet", tmp_path).split("train")


# --- tieredImageNet, image folder, glyphs --------------------------------------------------------------------


def test_tiered_imagenet_folders_validated_against_class_list(tmp_path: Path) -> None:
    val_classes = split_list("tiered-imagenet", "val")["class_names"]
    write_class_folders(tmp_path / "val", list(reversed(val_classes)), per_class=1, ext=".png")
    reader = create_reader("tiered-imagenet", tmp_path)
    assert reader.splits() == ["val"]
    spec = reader.split("val")
    assert spec.classes == sorted(val_classes) and len(spec.classes) == 97
    (tmp_path / "val" / val_classes[0] / "img000.png").unlink()  # a class folder without images
    with pytest.raises(DataError, match="holds no images"):
        reader.split("val")
    (tmp_path / "val" / val_classes[0]).rmdir()
    with pytest.raises(DataError, match="lacks 1 of the 97"):
        reader.split("val")
    with pytest.raises(DataError, match="split 'train' is not present"):
        reader.split("train")


def test_image_folder_extensions_are_case_insensitive(tmp_path: Path) -> None:
    for i, ext in enumerate([".jpg", ".JPEG", ".png", ".Bmp", ".webp"]):
        write_image(tmp_path / "train" / "cat" / f"x{i}{ext}", seed=i)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    write_image(tmp_path / "train" / "dog" / "y.jpg", seed=9)
    spec = create_reader("image-folder", tmp_path).split("train")
    assert spec.classes == ["cat", "dog"] and [len(s) for s in spec.sources] == [5, 1]


def test_glyphs_needs_no_root_and_has_disjoint_alphabets() -> None:
    reader = create_reader("glyphs", None)
    specs = {s: reader.split(s) for s in reader.splits()}
    counts = {s: len(spec.classes) for s, spec in specs.items()}
    assert sum(counts.values()) >= 400, counts
    assert 0.5 < counts["train"] / sum(counts.values()) < 0.7
    alphabets = {s: {c.split("/")[0] for c in spec.classes} for s, spec in specs.items()}
    assert not alphabets["train"] & alphabets["val"] and not alphabets["train"] & alphabets["test"]
    assert all(len(src) == 20 for spec in specs.values() for src in spec.sources)
    assert GlyphsReader("/ignored").split("val").classes == specs["val"].classes  # the root is not read


def test_glyph_instances_are_deterministic_and_distinct() -> None:
    sources = create_reader("glyphs", None).split("val").sources[0]
    a = [s.load() for s in sources]
    b = [s.load() for s in sources]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({np.asarray(x).tobytes() for x in a}) == 20


# --- real data (read in place) -----------------------------------------------------------------------------


def test_real_mini_imagenet_counts(shared_data: Path) -> None:
    reader = create_reader("mini-imagenet", resolve_root("mini-imagenet", shared_data))
    assert reader.splits() == ["train", "val"]
    counts = {s: (len(sp.classes), sp.num_images) for s in ("train", "val") for sp in [reader.split(s)]}
    assert counts == {"train": (64, 38400), "val": (16, 9600)}
    with pytest.raises(DataError, match="split 'test' is not present: no test.csv"):
        reader.split("test")


@pytest.mark.parametrize(
    ("scheme", "rotations", "expected"),
    [
        ("vinyals", False, [1028, 172, 423]),
        ("vinyals", True, [4112, 688, 1692]),
        ("lake", False, [964, 659]),
    ],
)
def test_real_omniglot_counts(shared_data: Path, scheme: str, rotations: bool, expected: list[int]) -> None:
    reader = create_reader(
        "omniglot", resolve_root("omniglot", shared_data), scheme=scheme, rotations=rotations
    )
    specs = [reader.split(s) for s in reader.splits()]
    assert [len(s.classes) for s in specs] == expected
    assert all(len(src) == 20 for s in specs for src in s.sources)

"""The decoded-image cache: decoding, reuse, rebuild on change, bad images, `check_dataset`, glyphs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import write_class_folders, write_image, write_omniglot
from metatransfer.config import DataConfig
from metatransfer.data import store as store_mod
from metatransfer.data.check import check_dataset
from metatransfer.data.store import decode_image, open_split
from metatransfer.errors import DataError


def _config(root: Path, cache_dir: Path, **kw: Any) -> DataConfig:
    return DataConfig(dataset="mini-imagenet", root=str(root), cache_dir=str(cache_dir), **kw)


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = store_mod._build

    def counting(*args: object, **kw: object) -> object:
        calls.append(str(args[2]))
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "_build", counting)
    return calls


def test_open_split_decodes_resizes_and_groups(mini_csv_root: Path, cache_dir: Path) -> None:
    store = open_split(_config(mini_csv_root, cache_dir, size=8), "train", progress=False)
    assert store.images.shape == (12, 8, 8, 3) and store.images.dtype == np.uint8
    assert store.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert store.offsets.tolist() == [0, 4, 8, 12] and len(store) == 12 and store.num_classes == 3
    first = mini_csv_root / "images" / "n0000000000000001.jpg"
    expected = np.asarray(Image.open(first).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(store.images[0], expected)


def test_cache_is_reused_then_rebuilt_when_a_file_changes(
    mini_csv_root: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = _count_builds(monkeypatch)
    cfg = _config(mini_csv_root, cache_dir, size=8)
    first = open_split(cfg, "val", progress=False)
    second = open_split(cfg, "val", progress=False)
    assert len(builds) == 1 and isinstance(second.images, np.memmap)
    assert np.array_equal(first.images, second.images)
    # Same size, new content and mtime: the stat fingerprint notices.
    changed = mini_csv_root / "images" / "n0100000000000001.jpg"
    write_image(changed, seed=12345)
    os.utime(changed, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    third = open_split(cfg, "val", progress=False)
    assert len(builds) == 2 and not np.array_equal(third.images[0], first.images[0])
    # A removed CSV row (fewer images) also rebuilds.
    lines = (mini_csv_root / "val.csv").read_text().splitlines()
    (mini_csv_root / "val.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert len(open_split(cfg, "val", progress=False)) == 7 and len(builds) == 3
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]  # replaced, no temporaries left


def test_damaged_cache_is_rebuilt(
    mini_csv_root: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = _count_builds(monkeypatch)
    cfg = _config(mini_csv_root, cache_dir, size=8)
    open_split(cfg, "val", progress=False)
    (npy,) = cache_dir.glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    assert len(open_split(cfg, "val", progress=False)) == 8 and len(builds) == 2


def test_interrupted_build_leaves_no_cache_and_stale_temporaries_are_removed(
    mini_csv_root: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(mini_csv_root, cache_dir, size=8)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_decode_jobs", crash)
    with pytest.raises(KeyboardInterrupt):
        open_split(cfg, "val", progress=False)
    assert list(cache_dir.iterdir()) == []  # neither a cache nor a temporary survives
    monkeypatch.undo()
    dead = subprocess.Popen(["true"])
    dead.wait()
    open_split(cfg, "val", progress=False)  # creates the cache entry; learn its stem
    (npy,) = cache_dir.glob("*.npy")
    stale = cache_dir / f"{npy.stem}.npy.{dead.pid}.abcd.tmp.npy"
    live = cache_dir / f"{npy.stem}.json.{os.getpid()}.abcd.tmp"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    npy.unlink()
    open_split(cfg, "val", progress=False)
    assert not stale.exists() and live.exists()  # a running process's temporary is left alone


def test_sizes_and_roots_get_separate_cache_entries(mini_csv_root: Path, cache_dir: Path) -> None:
    open_split(_config(mini_csv_root, cache_dir, size=8), "val", progress=False)
    open_split(_config(mini_csv_root, cache_dir, size=10), "val", progress=False)
    assert len(list(cache_dir.glob("*.npy"))) == 2


def test_default_cache_dir_follows_the_environment(
    mini_csv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "envcache"))
    open_split(DataConfig(dataset="mini-imagenet", root=str(mini_csv_root), size=8), "val", progress=False)
    assert len(list((tmp_path / "envcache").glob("mini-imagenet_val_8px_*.npy"))) == 1


def _bad_folder(root: Path) -> list[Path]:
    """Two good classes plus a truncated JPEG, an empty file and a text file named .jpg."""
    write_class_folders(root / "train", ["a", "b"], per_class=3)
    good = (root / "train" / "a" / "img000.jpg").read_bytes()
    bad = [
        root / "train" / "a" / "truncated.jpg",
        root / "train" / "b" / "empty.jpg",
        root / "train" / "b" / "text.jpg",
    ]
    bad[0].write_bytes(good[: len(good) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("this is not an image\n")
    return bad


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_check_names_every_bad_file_and_does_not_touch_the_source(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    bad = _bad_folder(root)
    before = _tree_digest(root)
    report = check_dataset("image-folder", root, cache_dir=tmp_path / "cache", size=16, progress=False)
    assert _tree_digest(root) == before
    text = report.render()
    assert not report.usable and all(str(p) in text for p in bad)
    assert "train: 2 classes, 6 images" in text and "val: not present" in text
    assert report.reason.count("\n") == 0 and "3 unreadable" in report.reason
    assert {b.path for b in report.bad} == {str(p) for p in bad}


def test_on_bad_image_fail_lists_all_and_skip_warns(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    bad = _bad_folder(root)
    cfg = DataConfig(dataset="image-folder", root=str(root), size=16, cache_dir=str(tmp_path / "c"))
    for attempt in range(2):  # the second time the cache answers, with the same verdict
        with pytest.raises(DataError) as e:
            open_split(cfg, "train", progress=False)
        assert all(str(p) in str(e.value) for p in bad) and "\n" not in str(e.value), attempt
    cfg.on_bad_image = "skip"
    with pytest.warns(UserWarning, match="skipping 3 unreadable") as w:
        store = open_split(cfg, "train", progress=False)
    assert all(str(p) in str(w[0].message) for p in bad)
    assert store.offsets.tolist() == [0, 3, 6] and len(store) == 6


def test_check_real_sizes_and_missing_split(mini_csv_root: Path, cache_dir: Path) -> None:
    report = check_dataset("mini-imagenet", mini_csv_root, cache_dir=cache_dir, size=8, progress=False)
    assert report.usable and report.missing == ["test"]
    assert report.render().splitlines()[:3] == [
        "train: 3 classes, 12 images",
        "val: 2 classes, 8 images",
        f"test: not present (no test split in {mini_csv_root})",
    ]


def test_omniglot_rotations_are_applied_after_decoding(tmp_path: Path) -> None:
    root = write_omniglot(tmp_path / "omniglot", drawers=1)
    cfg = DataConfig(
        dataset="omniglot", root=str(root), rotations=True, size=10, cache_dir=str(tmp_path / "c")
    )
    store = open_split(cfg, "val", progress=False)
    assert store.num_classes == 688 and store.images.shape == (688, 10, 10, 1)
    for k in range(4):
        assert np.array_equal(store.images[k], np.rot90(store.images[0], k))


def test_a_bad_image_of_rotated_classes_is_reported_once(tmp_path: Path) -> None:
    root = write_omniglot(tmp_path / "omniglot", drawers=2, extracted=True)
    (victim,) = sorted((root / "images_background").glob("*/*/*_01.png"))[:1]
    victim.write_bytes(b"")
    cfg = DataConfig(
        dataset="omniglot",
        root=str(root),
        scheme="lake",
        rotations=True,
        size=6,
        cache_dir=str(tmp_path / "c"),
    )
    cfg.on_bad_image = "skip"
    with pytest.warns(UserWarning, match="skipping 1 unreadable") as w:
        store = open_split(cfg, "train", progress=False)
    assert str(victim) in str(w[0].message)
    assert np.diff(store.offsets)[:4].tolist() == [1, 1, 1, 1] and len(store) == 4 * 964 * 2 - 4


def test_decode_image_converts_modes() -> None:
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 255
    out = decode_image(rgb, 4, 1)
    assert out.shape == (4, 4, 1) and 70 < out.mean() < 80  # red in luminance
    with pytest.raises(OSError, match="empty"):
        decode_image(b"", 4, 3)


@pytest.fixture(scope="module")
def glyph_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("glyphcache")))
    start = time.perf_counter()
    stores = {s: open_split(cfg, s, progress=False) for s in ("train", "val", "test")}
    return {"stores": stores, "seconds": time.perf_counter() - start, "cfg": cfg}


def test_glyphs_build_fast_and_in_shape(glyph_stores: dict) -> None:
    stores = glyph_stores["stores"]
    assert glyph_stores["seconds"] < 30
    assert sum(s.num_classes for s in stores.values()) >= 400
    for s in stores.values():
        assert s.images.shape[1:] == (28, 28, 1) and np.all(np.diff(s.offsets) == 20)
    start = time.perf_counter()
    open_split(glyph_stores["cfg"], "train", progress=False)
    assert time.perf_counter() - start < 3


def test_glyph_classes_are_learnable(glyph_stores: dict) -> None:
    """Nearest-centroid on raw pixels, 5-way 1-shot on the test alphabets, is far above chance (20 %)."""
    from metatransfer.data.sampler import EpisodeSampler

    store = glyph_stores["stores"]["test"]
    x = np.asarray(store.images, dtype=np.float32).reshape(len(store), -1) / 255
    sampler = EpisodeSampler(store, way=5, shot=1, query=5, seed=0)
    hits = []
    query_labels = np.repeat(np.arange(5), 5)  # episodes list each class's queries together, in class order
    for i in range(200):
        ep = sampler.episode(i)
        d = ((x[ep.query][:, None] - x[ep.support][None]) ** 2).sum(-1)
        hits.append(np.mean(d.argmin(1) == query_labels))
    assert np.mean(hits) > 0.4


# --- hostile files and full disks ----------------------------------------------------------------------


def test_a_fifo_is_skipped_with_a_warning_and_a_symlink_loop_is_a_bad_image(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    write_class_folders(root / "train", ["a", "b"], per_class=3)
    os.mkfifo(root / "train" / "a" / "pipe.png")  # reading it would block forever
    (root / "train" / "b" / "l1.png").symlink_to("l2.png")
    (root / "train" / "b" / "l2.png").symlink_to("l1.png")
    with pytest.warns(UserWarning, match=r"skipping 1 non-regular file.*pipe\.png"):
        report = check_dataset("image-folder", root, cache_dir=tmp_path / "cache", size=8, progress=False)
    assert "train: 2 classes, 6 images" in report.render()
    loops = {Path(b.path).name: b.reason for b in report.bad}
    assert set(loops) == {"l1.png", "l2.png"} and "symbolic links" in loops["l1.png"]


def test_a_fifo_named_as_a_query_is_an_error_not_a_hang(tmp_path: Path) -> None:
    from metatransfer.data.readers.base import read_regular_file

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file(tmp_path / "pipe.png")


def _leftover_temporaries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if ".tmp" in p.name or p.suffix == ".npy")


def test_a_full_disk_while_caching_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The space is reserved before the memory map is written: ENOSPC is an error there, not a SIGBUS."""
    import errno

    root = tmp_path / "folder"
    write_class_folders(root / "train", ["a", "b"], per_class=3)
    cache = tmp_path / "cache"

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cfg = DataConfig(dataset="image-folder", root=str(root), size=16, cache_dir=str(cache))
    with pytest.raises(DataError, match=r"no space for the image cache of train \(6 images\)") as info:
        open_split(cfg, "train", progress=False)
    assert "\n" not in str(info.value) and str(cache) in str(info.value)
    assert _leftover_temporaries(cache) == []
    monkeypatch.undo()
    assert len(open_split(cfg, "train", progress=False)) == 6  # with space, the same call builds it


@pytest.mark.parametrize("failing", ["sidecar", "folder"])
def test_an_unwritable_cache_is_one_line_and_keeps_no_half_built_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    import errno

    root = tmp_path / "folder"
    write_class_folders(root / "train", ["a", "b"], per_class=3)
    cache = tmp_path / "cache"
    if failing == "sidecar":  # the pixels fit, then the disk fills while the .json is written

        def full(path: Path, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store_mod, "_atomic_write_text", full)
    else:  # a file where the cache folder should be
        cache.write_text("not a folder")
    cfg = DataConfig(dataset="image-folder", root=str(root), size=16, cache_dir=str(cache / "sub"))
    with pytest.raises(DataError) as info:
        open_split(cfg, "train", progress=False)
    assert str(cache) in str(info.value) and "\n" not in str(info.value)
    if failing == "sidecar":
        assert _leftover_temporaries(cache) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_cache_dir_under_proc_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    write_class_folders(root / "train", ["a", "b"], per_class=3)
    cfg = DataConfig(dataset="image-folder", root=str(root), size=16, cache_dir="/proc/metatransfer-cache")
    with pytest.raises(DataError, match="/proc/metatransfer-cache") as info:
        open_split(cfg, "train", progress=False)
    assert "\n" not in str(info.value)


def test_an_image_over_the_pixel_limit_is_a_bad_image_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL only warns (and decodes) between its limit and twice it; here that is a bad image by path."""
    import warnings

    root = tmp_path / "folder"
    write_class_folders(root / "train", ["a", "b"], per_class=3)
    big = write_image(root / "train" / "a" / "big.png", seed=1, size=40)  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes
        report = check_dataset("image-folder", root, cache_dir=tmp_path / "cache", size=8, progress=False)
    assert [(b.path, b.reason) for b in report.bad] == [
        (str(big), "too many pixels (over 1,000), refused as a possible decompression bomb")
    ]


def test_an_empty_array_is_named_as_empty() -> None:
    with pytest.raises(OSError, match=r"empty image \(shape \[0, 0, 1\]\)"):
        decode_image(np.zeros((0, 0, 1), np.uint8), 8, 1)


@pytest.mark.skipif(
    subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unprivileged user and mount namespaces to mount a small tmpfs",
)
def test_a_real_full_tmpfs_while_caching_ends_with_one_line(tmp_path: Path) -> None:
    """`mtl data check` with the cache on a 300 kB tmpfs: exit 2, one line, no temporary file left."""
    import sys

    root = tmp_path / "folder"
    write_class_folders(root / "train", [f"c{i}" for i in range(4)], per_class=40)
    check = f"{sys.executable} -m metatransfer data check image-folder --root {root} --size 64"
    script = (
        "mount -t tmpfs -o size=300k tmpfs /mnt && "
        f"MTL_CACHE_DIR=/mnt/cache {check}; echo rc=$?; ls -a /mnt/cache"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env)
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mtl: error: no space for the image cache"), done.stderr
    listing = done.stdout.split("rc=2")[1].split()
    assert sorted(listing) == [".", ".."]  # no temporary, no half-built cache entry

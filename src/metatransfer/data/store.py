"""Decode a split once, keep it as a memory-mapped uint8 array, reuse it until the source files change.

Cache layout (under ``data.cache_dir``, ``$MTL_CACHE_DIR`` or ``~/.cache/metatransfer``)::

    <dataset>_<split>_<size>px[_<options>]_<root digest>.npy    [N, size, size, C] uint8, class-major
    <same stem>.json                                             classes, offsets, fingerprint, bad images

The fingerprint hashes every source's key and ``stat`` token (size + mtime; zips: the archive's stat and
each member's CRC), so checking it costs no reads and a changed, added or removed file triggers a rebuild.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import sys
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from metatransfer.config import ImageSize, Workers, check_value
from metatransfer.errors import DataError
from metatransfer.progress import track

from .readers import ImageSource, SplitSpec, create_reader
from .readers.base import describe_error

if TYPE_CHECKING:
    from metatransfer.config import DataConfig

CACHE_FORMAT = 1  # bump when the cache layout or the decoding changes
CHUNK = 256  # images per decode task: large enough to amortise scheduling, small for a smooth progress bar
MAX_LISTED = 50  # bad paths spelled out in one message; the sidecar JSON keeps all of them


@dataclass(frozen=True)
class BadImage:
    """A source that could not be decoded, with the reason (e.g. ``"OSError: image file is truncated"``)."""

    path: str
    reason: str


@dataclass
class ImageStore:
    """The decoded images of one split, grouped by class: class ``c`` is ``images[offsets[c]:offsets[c+1]]``."""

    images: np.ndarray  # [N, H, W, C] uint8 (usually a read-only np.memmap)
    labels: np.ndarray  # [N] int64, non-decreasing, 0..num_classes-1
    classes: list[str]
    split: str
    offsets: np.ndarray  # [num_classes + 1] int64

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_offsets(
        cls, images: np.ndarray, offsets: np.ndarray, classes: list[str], split: str
    ) -> ImageStore:
        """A store whose labels are derived from ``offsets`` ([C+1], offsets[-1] == len(images))."""
        offsets = np.asarray(offsets, dtype=np.int64)
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), np.diff(offsets))
        return cls(images=images, labels=labels, classes=classes, split=split, offsets=offsets)


def default_cache_dir() -> Path:
    """``$MTL_CACHE_DIR`` if set, else ``~/.cache/metatransfer``."""
    env = os.environ.get("MTL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metatransfer"


def decode_image(data: bytes | np.ndarray, size: int, channels: int) -> np.ndarray:
    """Encoded bytes or a decoded ``[H, W, C]`` uint8 array -> ``[size, size, channels]`` uint8.

    Non-square images are resized to a square (the benchmarks' convention), with bilinear filtering that
    antialiases when shrinking. Rotated copies (``SplitSpec.rotations``) are made by the caller.
    Raises whatever PIL raises for undecodable data.
    """
    mode = "L" if channels == 1 else "RGB"
    if isinstance(data, np.ndarray) and data.size == 0:
        raise OSError(f"empty image (shape {list(data.shape)})")
    if not len(data):
        raise OSError("empty file (0 bytes)")
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data[:, :, 0] if data.shape[-1] == 1 else data)
    else:
        img = Image.open(io.BytesIO(data))
        img.draft(mode, (size, size))  # JPEG: decode at a reduced scale when the target is much smaller
    img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


@contextlib.contextmanager
def refuse_decompression_bombs() -> Iterator[None]:
    """Within the block, an image over PIL's pixel limit is an error (a bad image), not a warning.

    PIL only warns between MAX_IMAGE_PIXELS and twice that, and decodes the image anyway. Warning
    filters are process-wide, so this is entered once around a whole decode (its worker threads see
    it) rather than per image.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def split_fingerprint(spec: SplitSpec, size: int) -> str:
    """SHA-256 over the decode settings, class names, rotations and every source's key and stat token."""
    h = hashlib.sha256(f"format={CACHE_FORMAT};size={size};channels={spec.channels}\n".encode())
    rotations = spec.rotations or [0] * len(spec.classes)
    for name, sources, rot in zip(spec.classes, spec.sources, rotations, strict=True):
        h.update(f"class={name};rot={rot};n={len(sources)}\n".encode())
        for src in sources:
            h.update(f"{src.key}\t{src.stat_fingerprint()}\n".encode())
    return h.hexdigest()


def _cache_stem(dataset: str, split: str, size: int, options: dict[str, Any], root: Path | None) -> str:
    opts = "".join(f"_{k}-{v}" for k, v in sorted(options.items()))
    where = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10] if root is not None else "builtin"
    return f"{dataset}_{split}_{size}px{opts}_{where}"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(cache: Path, stem: str) -> None:
    """Delete temporaries of ``stem`` left by builds whose process is gone (a crash mid-build)."""
    for tmp in cache.glob(f"{stem}.*.tmp*"):  # <stem>.{npy,json}.<pid>.<random>.tmp...
        try:
            pid = int(tmp.name.split(".")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, IndexError, PermissionError):
            continue


@dataclass(frozen=True)
class _Job:
    """One source to decode and the rows it fills (several when rotated copies are extra classes)."""

    source: ImageSource
    rows: list[tuple[int, int]]  # (row of the output array, quarter turns)


def _decode_jobs(jobs: Sequence[_Job], out: np.ndarray, channels: int) -> list[tuple[list[int], BadImage]]:
    """Decode each job's source once into its rows of ``out``; return the failures with their rows."""
    size = out.shape[1]
    bad = []
    for job in jobs:
        try:
            img = decode_image(job.source.load(), size, channels)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
            bad.append(([row for row, _ in job.rows], BadImage(job.source.key, decode_error_reason(e))))
            continue
        for row, turns in job.rows:
            out[row] = np.rot90(img, turns) if turns else img
    return bad


def decode_error_reason(e: Exception) -> str:
    """A short human reason for a decode failure (PIL's own messages embed object reprs)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image file"
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return f"too many pixels (over {Image.MAX_IMAGE_PIXELS:,}), refused as a possible decompression bomb"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return describe_error(e)


def _reserve(path: Path, what: str) -> None:
    """Allocate `path`'s whole size on disk now, so a full disk is an error here and not a SIGBUS when the
    memory map is written (a sparse file's blocks are only allocated on first write)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            size = os.fstat(fd).st_size
            raise DataError(
                f"no space for the image cache of {what} ({size / 2**20:.1f} MiB) in {path.parent}; "
                "free some space or set data.cache_dir (or $MTL_CACHE_DIR)"
            ) from e
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # no fallocate: write as is
            raise
    finally:
        os.close(fd)


def _build(
    spec: SplitSpec, size: int, npy_path: Path, workers: int, progress: bool, desc: str
) -> tuple[np.ndarray, list[BadImage]]:
    """Decode every image of ``spec`` into ``npy_path`` (atomically); return (offsets [C+1], bad images)."""
    rotations = spec.rotations or [0] * len(spec.classes)
    jobs: dict[str, _Job] = {}  # by source key, in row order
    row = 0
    for sources, turns in zip(spec.sources, rotations, strict=True):
        for src in sources:
            jobs.setdefault(src.key, _Job(src, [])).rows.append((row, turns))
            row += 1
    job_list = list(jobs.values())
    counts = np.array([len(s) for s in spec.sources], dtype=np.int64)
    tmp = npy_path.with_name(f"{npy_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")
    bad: list[tuple[list[int], BadImage]] = []
    # Threads, not processes: PIL releases the GIL while decoding and resizing, and threads can write
    # straight into the memory map (measured on 2 cores: ~1.7x serial, close to a process pool).
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(row, size, size, spec.channels)
        )
        _reserve(tmp, f"{spec.name} ({row} images)")
        with track(row, desc, "img", leave=False, enabled=progress) as bar, refuse_decompression_bombs():
            chunks = [job_list[a : a + CHUNK] for a in range(0, len(job_list), CHUNK)]
            futures = [pool.submit(_decode_jobs, chunk, out, spec.channels) for chunk in chunks]
            for chunk, fut in zip(chunks, futures, strict=True):
                bad.extend(fut.result())
                bar.update(sum(len(job.rows) for job in chunk))
        if bad:
            out, counts = _drop(out, tmp, [r for rows, _ in bad for r in rows], counts)
        out.flush()
        del out
        _fsync(tmp)  # the pixels reach the disk before the name (and then the sidecar) says they are there
        os.replace(tmp, npy_path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, do not decode the rest first
        tmp.unlink(missing_ok=True)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, [b for _, b in sorted(bad, key=lambda t: t[0][0])]


def _drop(out: np.memmap, tmp: Path, drop: list[int], counts: np.ndarray) -> tuple[np.memmap, np.ndarray]:
    """Rewrite the memory map ``tmp`` without rows ``drop``; per-class counts are reduced to match."""
    keep = np.ones(len(out), dtype=bool)
    keep[drop] = False
    labels = np.repeat(np.arange(len(counts)), counts)
    new_counts = np.bincount(labels[keep], minlength=len(counts)).astype(np.int64)
    compact = tmp.with_name(tmp.name + ".compact")
    try:
        dst = np.lib.format.open_memmap(
            compact, mode="w+", dtype=np.uint8, shape=(int(keep.sum()), *out.shape[1:])
        )
        _reserve(compact, f"{len(dst)} images")
    except BaseException:
        compact.unlink(missing_ok=True)
        raise
    rows = np.flatnonzero(keep)
    for a in range(0, len(rows), 4096):  # bounded memory for large splits
        dst[a : a + 4096] = out[rows[a : a + 4096]]
    del out
    os.replace(compact, tmp)
    return dst, new_counts


def reader_options(scheme: str | None, rotations: bool) -> dict[str, Any]:
    """Only the options that differ from the defaults, so other datasets are not offered them."""
    opts: dict[str, Any] = {}
    if scheme is not None:
        opts["scheme"] = scheme
    if rotations:
        opts["rotations"] = True
    return opts


def load_or_build(
    dataset: str,
    root: str | Path | None,
    split: str,
    *,
    size: int | None = None,
    scheme: str | None = None,
    rotations: bool = False,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> tuple[ImageStore, list[BadImage]]:
    """The split from the cache if its fingerprint matches, else decoded and cached now.

    Bad images are left out of the store and returned (also when loaded from the cache); the caller
    decides whether they are fatal. ``size=None`` uses the dataset's native size.
    """
    options = reader_options(scheme, rotations)
    reader = create_reader(dataset, root, **options)
    size = check_value(reader.default_size if size is None else size, ImageSize, "data.size")
    workers = check_value(workers, Workers, "data.workers")
    spec = reader.split(split)
    fingerprint = split_fingerprint(spec, size)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the cache folder {cache}: {e.strerror or describe_error(e)}; set data.cache_dir"
        ) from e
    stem = _cache_stem(
        dataset, split, size, reader.cache_options(), reader.root if reader.needs_root else None
    )
    npy_path, meta_path = cache / f"{stem}.npy", cache / f"{stem}.json"
    cached = _load_cached(npy_path, meta_path, fingerprint, spec)
    if cached is not None:
        return cached
    try:
        with _build_lock(cache):
            # Another process may have built the entry while we waited for the lock: use it.
            cached = _load_cached(npy_path, meta_path, fingerprint, spec)
            if cached is not None:
                return cached
            offsets, bad = _build_and_record(
                dataset, spec, size, fingerprint, npy_path, _worker_count(workers), progress
            )
            images = np.load(npy_path, mmap_mode="r")
    except OSError as e:  # disk full, read-only, not a folder, no permission: one line
        raise DataError(
            f"cannot write the image cache in {cache}: {e.strerror or describe_error(e)}; "
            "free some space or set data.cache_dir (or $MTL_CACHE_DIR)"
        ) from e
    return ImageStore.from_offsets(images, offsets, spec.classes, split), bad


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """Hold the cache folder's build lock: two processes (two `mtl run` on a fresh cache) then build an
    entry once, the second waiting and loading what the first built instead of decoding it again.

    The lock is the folder itself (flock on its descriptor), so it leaves no lock file behind; builds of
    different entries take turns, which costs little since one process builds its splits in turn anyway.
    """
    fd = os.open(cache, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"mtl: waiting for another process that is building an image cache in {cache}",
                file=sys.stderr,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)  # for as long as that build takes
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_and_record(
    dataset: str, spec: SplitSpec, size: int, fingerprint: str, npy_path: Path, workers: int, progress: bool
) -> tuple[np.ndarray, list[BadImage]]:
    """Build the cache array, then its sidecar (`.json`); if the sidecar cannot be written, drop the array too."""
    _remove_stale_temporaries(npy_path.parent, npy_path.stem)
    offsets, bad = _build(spec, size, npy_path, workers, progress, f"decoding {dataset} {spec.name}")
    meta = {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "split": spec.name,
        "size": size,
        "channels": spec.channels,
        "fingerprint": fingerprint,
        "classes": spec.classes,
        "offsets": offsets.tolist(),
        "bad": [[b.path, b.reason] for b in bad],
    }
    meta_path = npy_path.with_suffix(".json")
    try:
        _atomic_write_text(meta_path, json.dumps(meta))
    except BaseException:
        npy_path.unlink(missing_ok=True)  # an array no sidecar describes is never used: do not keep it
        raise
    return offsets, bad


def _worker_count(workers: int) -> int:
    """``workers``, or the number of cores this process may use when it is 0."""
    if workers:
        return workers
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _load_cached(
    npy_path: Path, meta_path: Path, fingerprint: str, spec: SplitSpec
) -> tuple[ImageStore, list[BadImage]] | None:
    """The cached split if present, complete and built from exactly these sources; else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
            return None
        offsets = np.asarray(meta["offsets"], dtype=np.int64)
        images = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: rebuild
    if images.ndim != 4 or len(images) != offsets[-1] or meta["classes"] != spec.classes:
        return None
    bad = [BadImage(str(p), str(r)) for p, r in meta.get("bad", [])]
    return ImageStore.from_offsets(images, offsets, list(meta["classes"]), spec.name), bad


def describe_bad(bad: Sequence[BadImage], dataset: str, split: str) -> str:
    """One line naming every bad image (the first ``MAX_LISTED``) with its reason."""
    listed = "; ".join(f"{b.path} ({b.reason})" for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return f"{len(bad)} unreadable image(s) in {dataset} '{split}': {listed}{more}"


def open_split(data: DataConfig, split: str, *, progress: bool = True) -> ImageStore:
    """The decoded, cached images of ``split`` of ``data.dataset`` at ``data.size`` px.

    Bad images: ``data.on_bad_image == "fail"`` raises DataError naming them all; ``"skip"`` warns naming
    them and leaves them out.
    """
    store, bad = load_or_build(
        data.dataset,
        data.root,
        split,
        size=data.size,
        scheme=data.scheme,
        rotations=data.rotations,
        cache_dir=data.cache_dir,
        workers=data.workers,
        progress=progress,
    )
    if bad:
        message = describe_bad(bad, data.dataset, split)
        if data.on_bad_image == "fail":
            raise DataError(f"{message}; fix or delete them, or set data.on_bad_image: skip")
        warnings.warn(f"skipping {message}", stacklevel=2)
    return store

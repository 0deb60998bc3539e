"""``mtl data check``: decode every image of every split, report bad files by path, build the cache.

Only reads the dataset folder; everything written goes to the cache folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .readers import create_reader
from .store import BadImage, load_or_build, reader_options


@dataclass(frozen=True)
class SplitReport:
    """One split that is present: class count and number of usable (decodable) images."""

    name: str
    classes: int
    images: int

    def line(self) -> str:
        return f"{self.name}: {self.classes} classes, {self.images} images"


@dataclass
class CheckReport:
    """The outcome of ``check_dataset``; ``render()`` gives the lines the CLI prints."""

    dataset: str
    root: str | None
    splits: list[SplitReport] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # splits the benchmark defines that are absent
    bad: list[BadImage] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """True when at least one split is present and every image decodes."""
        return bool(self.splits) and not self.bad

    @property
    def reason(self) -> str:
        """One line saying why the dataset is not usable ("" when it is)."""
        if not self.splits:
            return f"no split of {self.dataset} is present in {self.root}"
        if self.bad:
            return (
                f"{len(self.bad)} unreadable image(s) in {self.dataset} (listed above); fix or delete them, "
                "or train with data.on_bad_image: skip"
            )
        return ""

    def render(self) -> str:
        """``<split>: <C> classes, <N> images`` per present split, then absent splits, bad files, verdict."""
        lines = [s.line() for s in self.splits]
        lines += [f"{name}: not present (no {name} split in {self.root})" for name in self.missing]
        lines += [f"bad image: {b.path} ({b.reason})" for b in self.bad]
        if not self.usable:
            lines.append(f"error: {self.reason}")
        return "\n".join(lines)


def check_dataset(
    name: str,
    root: str | Path | None,
    *,
    scheme: str | None = None,
    rotations: bool = False,
    size: int | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> CheckReport:
    """Decode every image of every present split of dataset ``name`` under ``root`` (at ``size`` px, default
    the dataset's native size), caching the result; bad images are collected by path, never raised."""
    reader = create_reader(name, root, **reader_options(scheme, rotations))
    report = CheckReport(
        dataset=name, root=None if root is None else str(root), missing=reader.missing_splits()
    )
    for split in reader.splits():
        store, bad = load_or_build(
            name,
            root,
            split,
            size=size,
            scheme=scheme,
            rotations=rotations,
            cache_dir=cache_dir,
            workers=workers,
            progress=progress,
        )
        report.splits.append(SplitReport(split, store.num_classes, len(store)))
        report.bad.extend(bad)
    return report

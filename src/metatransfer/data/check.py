"""``mtl data check``: decode every image of every split, report bad files by path, build the cache.

Only reads the dataset folder; everything written goes to the cache folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from metatransfer.errors import ConfigError, DataError

from .readers import create_reader
from .store import BadImage, load_or_build, reader_options

if TYPE_CHECKING:
    from metatransfer.config import Config


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


@dataclass(frozen=True)
class Need:
    """What a phase's episodes ask of a split: `way` classes holding at least `per_class` images each."""

    split: str
    way: int
    per_class: int
    keys: str  # the config keys that set it, for the message


def episode_needs(cfg: Config, phases: Sequence[str]) -> list[Need]:
    """The episodes each of `phases` ("pretrain", "meta", "eval") will sample, as split requirements."""
    from metatransfer.train.pretrain import FewShotValidator

    needs = []
    if "pretrain" in phases:
        needs.append(Need("train", 2, 1, "pre-training"))
        val_per_class = max(cfg.pretrain.val_shots) + cfg.eval.query
        needs.append(Need("val", FewShotValidator.way, val_per_class, "pretrain.val_shots + eval.query"))
    if "meta" in phases:
        # `mtl run` meta-trains once per shot of eval.shots; alone, meta-train uses meta.shot.
        shot = max(cfg.eval.shots) if "eval" in phases else cfg.meta.shot
        per_class = shot + cfg.meta.query
        needs += [
            Need(s, cfg.meta.way, per_class, "meta.way, meta.shot + meta.query") for s in ("train", "val")
        ]
    if "eval" in phases:
        per_class = max(cfg.eval.shots) + cfg.eval.query
        needs.append(
            Need(cfg.eval.split, max(cfg.eval.ways), per_class, "eval.ways, eval.shots + eval.query")
        )
    return needs


def check_config_against_data(cfg: Config, phases: Sequence[str]) -> None:
    """Refuse, before any training, a config the dataset cannot serve: too few classes for a way, classes
    too small for shot + query, a missing split, an image size below the backbone's minimum.

    Only lists the dataset (no decoding); DataError/ConfigError naming the keys otherwise.
    """
    data = cfg.data
    reader = create_reader(data.dataset, data.root, **reader_options(data.scheme, data.rotations))
    _check_backbone(cfg, reader.channels)
    sizes: dict[str, list[int]] = {}
    for need in episode_needs(cfg, phases):
        if need.split not in sizes:
            spec = reader.split(need.split)  # DataError naming the missing split
            sizes[need.split] = [len(s) for s in spec.sources]
        counts = sizes[need.split]
        if need.way > len(counts):
            raise DataError(
                f"{data.dataset} '{need.split}' has {len(counts)} classes, fewer than the {need.way}-way "
                f"episodes of {need.keys}; lower the way"
            )
        if min(counts) < need.per_class:  # the episode sampler asks it of every class
            raise DataError(
                f"{need.keys} need {need.per_class} images per class, but a class of {data.dataset} "
                f"'{need.split}' has only {min(counts)}; lower them"
            )


def _check_backbone(cfg: Config, channels: int) -> None:
    """The backbone and its options are valid and `data.size` is at least its smallest input (no allocation)."""
    import torch

    from metatransfer.models.backbones import create_backbone

    with torch.device("meta"):
        backbone = create_backbone(cfg.model.backbone, channels, **cfg.model.backbone_args)
    if cfg.data.size < backbone.min_size:
        raise ConfigError(
            f"config key 'data.size' is {cfg.data.size}, but backbone {cfg.model.backbone} needs images of "
            f"at least {backbone.min_size} px"
        )

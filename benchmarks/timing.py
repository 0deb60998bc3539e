"""Timing in alternating rounds, and the table row that carries one figure per round for both paths.

A shared machine has bursts of load from other processes. Timing the reference and the project in
alternation (reference, project, reference, project, ...) lets a burst fall on both paths alike, and
reporting the median of the per-round ratios with its min-max shows how far one burst moved them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

R = TypeVar("R")
P = TypeVar("P")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Rounds(Generic[R, P]):
    """What each path's round returned: round 0 (the warm-up, not counted) and rounds 1..n."""

    warm_up: tuple[R, P]
    reference: list[R]
    project: list[P]


def alternate(reference: Callable[[int], R], project: Callable[[int], P], rounds: int) -> Rounds[R, P]:
    """Call ``reference(k)`` then ``project(k)`` for k = 0 (warm-up) .. rounds; each returns its figures."""
    warm = (reference(0), project(0))
    refs: list[R] = []
    projs: list[P] = []
    for k in range(1, rounds + 1):
        refs.append(reference(k))
        projs.append(project(k))
    return Rounds(warm, refs, projs)


@dataclass(frozen=True)
class Spread:
    """Median and range of a figure over rounds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no rounds to summarise")
        return cls(statistics.median(values), min(values), max(values))

    def text(self, unit: str = "", digits: int = 1) -> str:
        """``2.6x [2.3–2.9]`` for unit "x"."""
        return f"{self.median:.{digits}f}{unit} [{self.low:.{digits}f}–{self.high:.{digits}f}]"


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure per round for the reference loop and for the project.

    ``ratio`` is False where project/reference is no speed-up (two different peaks, say).
    """

    section: str
    figure: str
    unit: str
    reference: tuple[float, ...]
    project: tuple[float, ...]
    note: str = ""
    ratio: bool = True

    @property
    def speedups(self) -> list[float]:
        """project / reference of each round (paired: the two halves of one round saw the same load)."""
        if not self.ratio:
            return []
        return [p / r for p, r in zip(self.project, self.reference, strict=True) if r > 0]

    @property
    def speedup(self) -> Spread | None:
        return Spread.of(self.speedups) if self.speedups else None

    def to_json(self) -> dict[str, object]:
        s = self.speedup
        return {
            "section": self.section,
            "figure": self.figure,
            "unit": self.unit,
            "reference": list(self.reference),
            "project": list(self.project),
            "reference_median": statistics.median(self.reference),
            "project_median": statistics.median(self.project),
            "speedup": None if s is None else {"median": s.median, "min": s.low, "max": s.high},
            "rounds": len(self.project),
            "note": self.note,
        }


def rate(work: float, fn: Callable[[], object], device: torch.device) -> float:
    """``work`` units (tasks, images, episodes) per second of ``fn()``."""
    return work / seconds(fn, device)

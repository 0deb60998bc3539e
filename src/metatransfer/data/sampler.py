"""N-way K-shot episodes, each a pure function of (seed, episode index).

Episode ``i`` draws from its own ``np.random.default_rng([seed, i])``, so an evaluation set is the same on
every machine and run, any single episode can be re-created alone, and episodes can be split across
processes without coordination. Hard-task episodes use a separate stream (``[seed, i, HARD_STREAM, salt]``),
so enabling hard tasks leaves the ordinary episode sequence unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from metatransfer.errors import DataError

from .store import ImageStore

HARD_STREAM = 0x48415244  # "HARD": a non-zero word, so hard streams never equal the 2-word ordinary seeds


@dataclass(frozen=True)
class Episode:
    """Store indices of one episode; labels are implicit (class-major order)."""

    index: int
    classes: np.ndarray  # [way] store class ids; episode label j <-> classes[j]
    support: np.ndarray  # [way * shot] store image indices; label of support[k] is k // shot
    query: np.ndarray  # [way * query] store image indices; label of query[k] is k // query


class EpisodeSampler:
    """Samples ``way``-way ``shot``-shot episodes with ``query`` query images per class.

    ``store_or_offsets`` is an ImageStore or class offsets ``[C + 1]`` (class c = images off[c]:off[c+1]).
    """

    def __init__(
        self,
        store_or_offsets: ImageStore | np.ndarray | Sequence[int],
        way: int,
        shot: int,
        query: int,
        seed: int,
    ) -> None:
        if isinstance(store_or_offsets, ImageStore):
            offsets = store_or_offsets.offsets
            self.class_names: list[str] | None = store_or_offsets.classes
            where = f"split '{store_or_offsets.split}'"
        else:
            offsets = np.asarray(store_or_offsets)
            self.class_names = None
            where = "the split"
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or np.any(np.diff(self.offsets) < 0):
            raise ValueError(
                f"offsets must be a non-decreasing 1-D array [C+1], got shape {self.offsets.shape}"
            )
        for name, value, low in (("way", way, 2), ("shot", shot, 1), ("query", query, 1), ("seed", seed, 0)):
            if not isinstance(value, int | np.integer) or value < low:
                raise DataError(f"{name}={value!r} is invalid; it must be an integer >= {low}")
        self.way, self.shot, self.query, self.seed = int(way), int(shot), int(query), int(seed)
        self.sizes = np.diff(self.offsets)
        num_classes = len(self.sizes)
        if way > num_classes:
            raise DataError(f"way={way} but {where} has only {num_classes} classes; lower --way")
        smallest = int(np.argmin(self.sizes))
        if shot + query > self.sizes[smallest]:
            name = self.class_names[smallest] if self.class_names else f"#{smallest}"
            raise DataError(
                f"shot+query={shot + query} but class '{name}' of {where} has only {self.sizes[smallest]} images; "
                "lower --shot/--query"
            )

    @property
    def num_classes(self) -> int:
        return len(self.sizes)

    def episode(self, i: int) -> Episode:
        """Episode ``i`` (>= 0): ``way`` distinct random classes, ``shot + query`` distinct images each."""
        rng = np.random.default_rng([self.seed, self._index(i)])
        classes = rng.choice(self.num_classes, size=self.way, replace=False)
        return self._draw(rng, int(i), classes, {})

    def episode_for_classes(
        self,
        i: int,
        classes: Sequence[int] | np.ndarray,
        *,
        salt: int,
        exclude: Mapping[int, set[int]] | None = None,
    ) -> Episode:
        """Episode ``i`` of the stream ``salt`` over the given ``way`` classes (hard tasks), with fresh images:
        images listed in ``exclude[c]`` are avoided while class ``c`` has ``shot + query`` others.

        The classes are labelled in a random order of that stream, as ``episode`` labels its own: given
        hardest first, label 0 would always be the hardest class and bias theta's first row."""
        cls = np.asarray(classes, dtype=np.int64)
        if cls.shape != (self.way,) or len(set(cls.tolist())) != self.way:
            raise ValueError(f"expected {self.way} distinct class ids, got {cls.tolist()}")
        if cls.min() < 0 or cls.max() >= self.num_classes:
            raise ValueError(f"class ids must lie in 0..{self.num_classes - 1}, got {cls.tolist()}")
        if not isinstance(salt, int | np.integer) or salt < 0:
            raise ValueError(f"salt must be an integer >= 0, got {salt!r}")
        rng = np.random.default_rng([self.seed, self._index(i), HARD_STREAM, int(salt)])
        return self._draw(rng, int(i), rng.permutation(cls), exclude or {})

    @staticmethod
    def _index(i: int) -> int:
        if not isinstance(i, int | np.integer) or i < 0:
            raise ValueError(f"episode index must be an integer >= 0, got {i!r}")
        return int(i)

    def _draw(
        self, rng: np.random.Generator, i: int, classes: np.ndarray, exclude: Mapping[int, set[int]]
    ) -> Episode:
        n = self.shot + self.query
        picks = np.empty((self.way, n), dtype=np.int64)
        for j, c in enumerate(classes.tolist()):
            start, size = int(self.offsets[c]), int(self.sizes[c])
            avoid = exclude.get(c)
            if avoid:
                local = np.arange(start, start + size)
                fresh = local[~np.isin(local, np.fromiter(avoid, dtype=np.int64))]
                if len(fresh) >= n:
                    picks[j] = rng.choice(fresh, size=n, replace=False)
                    continue
                # Too few fresh images: all fresh ones, topped up with random used ones.
                used = np.setdiff1d(local, fresh)
                top_up = rng.choice(used, size=n - len(fresh), replace=False)
                picks[j] = rng.permutation(np.concatenate([fresh, top_up]))
            else:
                picks[j] = start + rng.choice(size, size=n, replace=False)
        return Episode(
            index=i,
            classes=classes.astype(np.int64),
            support=picks[:, : self.shot].reshape(-1),
            query=picks[:, self.shot :].reshape(-1),
        )

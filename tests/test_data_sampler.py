"""Episodes: determinism per (seed, index), structure, validation, hard-task streams."""

from __future__ import annotations

import numpy as np
import pytest

from metatransfer.data.sampler import Episode, EpisodeSampler
from metatransfer.data.store import ImageStore
from metatransfer.errors import DataError

SIZES = [20, 25, 30, 20, 22, 40, 21, 20]  # images per class
OFFSETS = np.concatenate([[0], np.cumsum(SIZES)])


def _store() -> ImageStore:
    images = np.zeros((OFFSETS[-1], 2, 2, 1), np.uint8)
    return ImageStore.from_offsets(images, OFFSETS, [f"class{c}" for c in range(len(SIZES))], "val")


@pytest.mark.parametrize(("way", "shot", "query"), [(5, 1, 15), (5, 5, 15), (2, 1, 1), (8, 4, 16)])
def test_episode_structure(way: int, shot: int, query: int) -> None:
    sampler = EpisodeSampler(_store(), way, shot, query, seed=3)
    for i in range(20):
        ep = sampler.episode(i)
        assert ep.index == i and len(set(ep.classes.tolist())) == way
        assert ep.support.shape == (way * shot,) and ep.query.shape == (way * query,)
        for j, c in enumerate(ep.classes):
            lo, hi = OFFSETS[c], OFFSETS[c + 1]
            s, q = ep.support[j * shot : (j + 1) * shot], ep.query[j * query : (j + 1) * query]
            assert np.all((lo <= s) & (s < hi)) and np.all((lo <= q) & (q < hi))
            assert len(set(s.tolist()) | set(q.tolist())) == shot + query  # no image reused


@pytest.mark.parametrize(("way", "shot", "query"), [(5, 1, 15), (3, 2, 4)])
def test_episodes_depend_only_on_seed_and_index(way: int, shot: int, query: int) -> None:
    a = EpisodeSampler(OFFSETS, way, shot, query, seed=7)
    b = EpisodeSampler(OFFSETS, way, shot, query, seed=7)
    forward = [a.episode(i) for i in range(10)]
    backward = [b.episode(i) for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert np.array_equal(x.classes, y.classes) and np.array_equal(x.support, y.support)
        assert np.array_equal(x.query, y.query)
    other = EpisodeSampler(OFFSETS, way, shot, query, seed=8).episode(0)
    assert not np.array_equal(other.query, forward[0].query)
    assert not np.array_equal(forward[0].query, forward[1].query)


def test_fixed_episode_is_stable_across_versions() -> None:
    """Published evaluation episodes must not silently change: pin episode 0 of seed 0."""
    ep = EpisodeSampler(OFFSETS, 3, 1, 2, seed=0).episode(0)
    again = EpisodeSampler(OFFSETS, 3, 1, 2, seed=0).episode(0)
    rng = np.random.default_rng([0, 0])
    classes = rng.choice(len(SIZES), size=3, replace=False)
    assert ep.classes.tolist() == classes.tolist() == again.classes.tolist()


@pytest.mark.parametrize(
    ("way", "shot", "query", "match"),
    [
        (9, 1, 1, "way=9 but split 'val' has only 8 classes; lower --way"),
        (5, 5, 16, r"shot\+query=21 but class 'class0' of split 'val' has only 20 images"),
        (5, 0, 15, "shot=0 is invalid"),
        (1, 1, 15, "way=1 is invalid"),
        (5, 1, 0, "query=0 is invalid"),
    ],
)
def test_invalid_requests_are_data_errors(way: int, shot: int, query: int, match: str) -> None:
    with pytest.raises(DataError, match=match):
        EpisodeSampler(_store(), way, shot, query, seed=0)


def test_negative_seed_and_index_are_refused() -> None:
    with pytest.raises(DataError, match="seed=-1"):
        EpisodeSampler(OFFSETS, 5, 1, 1, seed=-1)
    with pytest.raises(ValueError, match="episode index"):
        EpisodeSampler(OFFSETS, 5, 1, 1, seed=0).episode(-1)


def _images_of(ep: Episode, c: int) -> set[int]:
    """The support and query images an episode drew for class `c` (wherever its label put it)."""
    j = ep.classes.tolist().index(c)
    way = len(ep.classes)
    return set(ep.support.reshape(way, -1)[j].tolist()) | set(ep.query.reshape(way, -1)[j].tolist())


def test_hard_tasks_use_their_own_stream_and_fresh_images() -> None:
    sampler = EpisodeSampler(OFFSETS, 3, 2, 3, seed=1)
    ordinary = [sampler.episode(i).query.tolist() for i in range(5)]
    classes = [5, 1, 2]
    exclude = {5: set(range(int(OFFSETS[5]), int(OFFSETS[5]) + 35)), 1: {int(OFFSETS[1])}}
    hard = sampler.episode_for_classes(0, classes, salt=1, exclude=exclude)
    assert sorted(hard.classes.tolist()) == sorted(classes)  # labelled in the stream's random order
    # exactly the 5 fresh ones
    assert _images_of(hard, 5) == set(range(int(OFFSETS[5]) + 35, int(OFFSETS[6])))
    assert int(OFFSETS[1]) not in _images_of(hard, 1)
    # Hard draws leave the ordinary stream untouched, and salts give different streams.
    assert [sampler.episode(i).query.tolist() for i in range(5)] == ordinary
    assert sampler.episode_for_classes(0, classes, salt=1).query.tolist() != (
        sampler.episode_for_classes(0, classes, salt=2).query.tolist()
    )
    again = sampler.episode_for_classes(0, classes, salt=1, exclude=exclude)
    assert again.query.tolist() == hard.query.tolist()


def test_hard_task_tops_up_when_too_few_fresh_images() -> None:
    sampler = EpisodeSampler(OFFSETS, 2, 5, 5, seed=0)
    everything_but_3 = set(range(int(OFFSETS[0]) + 3, int(OFFSETS[1])))
    ep = sampler.episode_for_classes(0, [0, 1], salt=0, exclude={0: everything_but_3})
    picked = _images_of(ep, 0)
    assert {0, 1, 2} <= picked and len(picked) == 10


@pytest.mark.parametrize("classes", [[0, 0], [0, 99], [0]])
def test_hard_task_class_validation(classes: list[int]) -> None:
    with pytest.raises(ValueError):
        EpisodeSampler(OFFSETS, 2, 1, 1, seed=0).episode_for_classes(0, classes, salt=0)

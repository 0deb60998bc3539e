"""Meta-test: the CI formula, the report line, nearest-mean and linear classification, and episode
determinism of evaluate_features over a feature matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metatransfer.data.sampler import EpisodeSampler
from metatransfer.models.base_learner import InnerLoop
from metatransfer.train.evaluate import (
    classify,
    confidence_interval,
    episode_labels,
    evaluate_features,
    format_accuracy,
    format_delta,
    paired_difference,
)

WSQ = [(2, 1, 1), (5, 1, 3), (5, 5, 2), (3, 2, 4)]


def test_confidence_interval_hand_example() -> None:
    # mean 0.7; deviations -0.2, 0, 0.2 -> population variance 0.08 / 3; CI = 1.96 * sqrt(0.08/3) / sqrt(3)
    # = 1.96 * sqrt(0.08) / 3 = 1.96 * 0.28284271 / 3 = 0.18479057
    mean, ci = confidence_interval([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert ci == pytest.approx(0.18479057, abs=1e-8)
    a = np.array([0.5, 0.7, 0.9])
    assert ci == pytest.approx(1.96 * np.std(a) / math.sqrt(3), abs=1e-15)


def test_confidence_interval_edge_cases() -> None:
    assert confidence_interval([0.25]) == (0.25, 0.0)
    assert confidence_interval(np.full(600, 0.6)) == pytest.approx((0.6, 0.0))
    with pytest.raises(ValueError, match="no episodes"):
        confidence_interval([])


def test_paired_difference_hand_example() -> None:
    # Method A and B on the same four episodes: A - B = [0.1, 0.0, 0.2, 0.1], mean 0.1,
    # population std sqrt(((0)^2 + 0.1^2 + 0.1^2 + 0^2) / 4) = sqrt(0.005), CI = 1.96 * sqrt(0.005) / 2.
    a = [0.7, 0.5, 0.9, 0.6]
    b = [0.6, 0.5, 0.7, 0.5]
    mean, ci = paired_difference(a, b)
    assert mean == pytest.approx(0.1)
    assert ci == pytest.approx(1.96 * math.sqrt(0.005) / 2)
    # Two separate intervals would overlap (each about +-0.14 here); the paired one excludes 0.
    assert ci < mean < confidence_interval(a)[1] + confidence_interval(b)[1]
    assert format_delta(mean, ci) == "+10.00 ± 6.93"
    assert format_delta(-0.0123, 0.0017) == "-1.23 ± 0.17"
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference([0.5, 0.5], [0.5])


def test_format_accuracy_line() -> None:
    line = format_accuracy(0.612, 0.008, 600, 5, 1, "test")
    assert line == "accuracy: 61.20 ± 0.80 % (95% CI, 600 episodes, 5-way 1-shot, test split)"
    assert format_accuracy(0.98765, 0.00123, 10000, 20, 5, "val") == (
        "accuracy: 98.77 ± 0.12 % (95% CI, 10000 episodes, 20-way 5-shot, val split)"
    )


def test_episode_labels_are_class_major() -> None:
    assert episode_labels(3, 2, 2).tolist() == [[0, 0, 1, 1, 2, 2]] * 2


# --- classification on hand-made features ----------------------------------------------------------------


def test_ncm_picks_the_nearest_class_mean_by_cosine() -> None:
    xs = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]])  # class 0, 0, 1, 1 (unit vectors)
    ys = torch.tensor([[0, 0, 1, 1]])
    xq = torch.tensor([[[1.0, 0.1], [-1.0, 0.5], [0.2, 1.0], [2.0, 0.0]]])
    scores = classify(xs, ys, xq, 2, "ncm")
    # class means (1.8, 0.6)/2 and (-0.6, 1.8)/2, i.e. directions (3, 1) and (-1, 3) over sqrt(10)
    protos = np.array([[3.0, 1.0], [-1.0, 3.0]]) / math.sqrt(10)
    q = xq[0].numpy() / np.linalg.norm(xq[0].numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(scores[0].numpy(), q @ protos.T, atol=1e-6)
    assert scores.argmax(-1).tolist() == [[0, 1, 1, 0]]


def test_ncm_normalises_each_support_feature_before_averaging() -> None:
    # Class 0: (100, 0) and (0, 1); the mean of their unit vectors points along (1, 1), the raw mean
    # along (1, 0.01). Class 1: twice (0.3, 1). The query (1, 1) is class 0 only if each support
    # feature is normalised first (cosine 1.0 vs 0.88; with raw means 0.71 vs 0.88).
    xs = torch.tensor([[[100.0, 0.0], [0.0, 1.0], [0.3, 1.0], [0.3, 1.0]]])
    ys = torch.tensor([[0, 0, 1, 1]])
    xq = torch.tensor([[[1.0, 1.0]]])
    scores = classify(xs, ys, xq, 2, "ncm")
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor(1.0))
    assert scores.argmax(-1).item() == 0
    scaled = classify(xs * 7.0, ys, xq * 3.0, 2, "ncm")  # scores are cosines: scale-free
    torch.testing.assert_close(scaled, scores)


def test_linear_with_zero_init_and_no_steps_is_uniform() -> None:
    torch.manual_seed(0)
    xs, xq = torch.randn(4, 6, 5), torch.randn(4, 9, 5)
    ys = episode_labels(3, 2, 4)
    scores = classify(xs, ys, xq, 3, "linear", InnerLoop(steps=0, lr=0.1))
    assert scores.shape == (4, 9, 3)
    assert torch.equal(scores, torch.zeros_like(scores))
    probs = F.softmax(scores, -1)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 3))


def test_linear_uses_the_given_init_for_every_task() -> None:
    way, d = 3, 4
    w0 = torch.zeros(way, d)
    b0 = torch.tensor([0.0, 2.0, 0.0])  # a bias towards class 1 that no step removes
    xs, xq = torch.randn(5, way, d), torch.randn(5, 2, d)
    scores = classify(xs, episode_labels(way, 1, 5), xq, way, "linear", InnerLoop(steps=0, lr=0.1), (w0, b0))
    assert scores.argmax(-1).eq(1).all()


@pytest.mark.parametrize("method", ["ncm", "linear"])
def test_separable_features_are_classified_correctly(method: str) -> None:
    way, shot, query, tasks = 4, 2, 3, 2
    centers = torch.eye(way, 6) * 5
    torch.manual_seed(1)
    xs = centers.repeat_interleave(shot, 0) + 0.1 * torch.randn(tasks, way * shot, 6)
    xq = centers.repeat_interleave(query, 0) + 0.1 * torch.randn(tasks, way * query, 6)
    scores = classify(xs, episode_labels(way, shot, tasks), xq, way, method, InnerLoop(steps=30, lr=0.5))
    assert torch.equal(scores.argmax(-1), episode_labels(way, query, tasks))


def test_classify_rejects_unknown_method_and_missing_loop() -> None:
    x, y = torch.randn(1, 2, 3), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="unknown classification method 'knn'"):
        classify(x, y, x, 2, "knn")
    with pytest.raises(ValueError, match="needs an InnerLoop"):
        classify(x, y, x, 2, "linear")


# --- evaluate_features ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeEpisode:
    support: np.ndarray
    query: np.ndarray


@dataclass
class FakeSampler:
    """Duck-typed sampler: fixed episodes over a hand-made feature matrix."""

    episodes: list[FakeEpisode]
    way: int = 2
    shot: int = 1
    query: int = 2

    def episode(self, i: int) -> FakeEpisode:
        return self.episodes[i]


def test_evaluate_features_hand_accuracy() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.0, 1.0], [0.2, 1.0]])
    # episode 0: supports 0 (A) and 1 (B); queries of A are 2 (right) and 3 (nearer B: wrong),
    # queries of B are 4 and 5 (both right) -> 3/4. Episode 1 swaps the classes' roles -> 3/4 again,
    # episode 2 labels everything backwards -> 1/4.
    sampler = FakeSampler(
        [
            FakeEpisode(np.array([0, 1]), np.array([2, 3, 4, 5])),
            FakeEpisode(np.array([1, 0]), np.array([4, 5, 2, 3])),
            FakeEpisode(np.array([1, 0]), np.array([2, 3, 4, 5])),
        ]
    )
    accs = evaluate_features(features, sampler, 3, "ncm")  # type: ignore[arg-type]
    np.testing.assert_allclose(accs, [0.75, 0.75, 0.25])
    np.testing.assert_allclose(evaluate_features(features, sampler, 0, "ncm", ids=[2, 0]), [0.25, 0.75])  # type: ignore[arg-type]


def _clustered_features(
    classes: int, per_class: int, d: int = 8, noise: float = 1.2
) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, d, generator=g)
    feats = centers.repeat_interleave(per_class, 0) + noise * torch.randn(classes * per_class, d, generator=g)
    return feats, np.arange(classes + 1) * per_class


@pytest.mark.parametrize("way,shot,query", WSQ)
@pytest.mark.parametrize("method", ["ncm", "linear"])
def test_evaluate_features_is_deterministic_and_chunk_independent(
    way: int, shot: int, query: int, method: str
) -> None:
    features, offsets = _clustered_features(classes=8, per_class=12)
    loop = InnerLoop(steps=5, lr=0.5)
    run = lambda seed, **kw: evaluate_features(  # noqa: E731
        features, EpisodeSampler(offsets, way, shot, query, seed), 40, method, loop=loop, **kw
    )
    first = run(0)
    assert first.shape == (40,) and first.dtype == np.float32
    assert 0 < first.mean() < 1  # noisy enough that episodes differ, so equality below means something
    assert len(np.unique(first)) > 1
    np.testing.assert_array_equal(run(0), first)  # same seed: same episodes, same accuracies
    np.testing.assert_array_equal(run(0, chunk=7), first)  # batching does not change any episode
    np.testing.assert_array_equal(run(0, ids=[5, 39, 0]), first[[5, 39, 0]])
    assert not np.array_equal(run(1), first)  # another seed draws other episodes
    # each accuracy is a multiple of 1 / (way * query)
    np.testing.assert_allclose(first * way * query, np.round(first * way * query), atol=1e-5)

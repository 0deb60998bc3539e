"""Few-shot episodes over cached features: the engine of meta-test (phase 3, `meta_test.py`) and of
the validations of phases 1 and 2.

Phi is fixed at test time, so every image's feature is computed once (eval mode) and each episode
only gathers rows of that [N, d] matrix. The inner loops of many episodes then run as one batched
loop (see `models.base_learner`), which is why 10,000 episodes cost little more than 600.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metatransfer.data.augment import to_float
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import ImageStore
from metatransfer.device import Runtime, eval_mode
from metatransfer.models.base_learner import InnerLoop, adapt, logits, prepare, prototype_classifier
from metatransfer.progress import track

# Nearest class mean (cosine): the base learner's prototype start on normalised features, with no steps.
NCM = InnerLoop(steps=0, lr=1.0, temperature=1.0, normalize=True, init="proto")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    store: ImageStore,
    runtime: Runtime,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    indices: np.ndarray | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Features of the store's images (all, or `indices`) in eval mode: [N, d] float32 on the CPU."""
    rows = np.arange(len(store)) if indices is None else np.asarray(indices)
    out: list[torch.Tensor] = []
    with eval_mode(backbone):
        starts = range(0, len(rows), batch_size)
        bar = track(len(starts), f"features {store.split}", "batch", leave=False, enabled=progress)
        for start in starts:
            batch = torch.from_numpy(np.ascontiguousarray(store.images[rows[start : start + batch_size]]))
            x = runtime.images(to_float(batch, mean, std))
            with runtime.autocast():
                f = backbone(x)
            out.append(f.float().cpu())
            bar.update(1)
        bar.close()
    return torch.cat(out) if out else torch.empty(0)


@dataclass(frozen=True)
class EpisodeBatch:
    """Indices of E episodes: support [E, way*shot], query [E, way*query] rows into a feature matrix."""

    ids: np.ndarray  # [E] episode numbers
    support: np.ndarray
    query: np.ndarray


def episode_batch(sampler: EpisodeSampler, ids: Sequence[int] | np.ndarray) -> EpisodeBatch:
    episodes = [sampler.episode(int(i)) for i in ids]
    return EpisodeBatch(
        ids=np.asarray(ids, dtype=np.int64),
        support=np.stack([e.support for e in episodes]),
        query=np.stack([e.query for e in episodes]),
    )


def episode_labels(way: int, per_class: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """Class-major labels [count, way*per_class]: 0,0,..,1,1,.. as the sampler orders images."""
    return torch.arange(way, device=device).repeat_interleave(per_class).expand(count, -1)


def classify(
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    way: int,
    method: str,
    loop: InnerLoop | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores [T, nq, way] for query features xq [T, nq, d] after learning from support xs [T, ns, d], ys [T, ns].

    method "ncm": cosine similarity to class means (ProtoNet-style, no training);
    "linear": the base learner adapted by `loop` from `init` (the meta-learned theta; zeros if None).
    """
    if method == "ncm":
        w, b = prototype_classifier(prepare(xs, NCM), ys, way, NCM)
        return logits(prepare(xq, NCM), w, b, NCM)
    if method == "linear":
        if loop is None:
            raise ValueError("method 'linear' needs an InnerLoop")
        w, b = fit_linear(xs, ys, way, loop, init)
        return logits(prepare(xq, loop), w, b, loop)
    raise ValueError(f"unknown classification method {method!r}; use 'ncm' or 'linear'")


def fit_linear(
    xs: torch.Tensor,
    ys: torch.Tensor,
    way: int,
    loop: InnerLoop,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base learner adapted on support xs [T, ns, d], ys [T, ns] by `loop` from `init` (zeros if None):
    weights [T, way, d] and bias [T, way]; score queries with `logits(prepare(xq, loop), w, b, loop)`.

    Split from `classify` so a caller that classifies many query batches adapts once (`FewShotLearner`)."""
    t, d = xs.shape[0], xs.shape[2]
    if init is None:
        w0 = torch.zeros(t, way, d, device=xs.device)
        b0 = torch.zeros(t, way, device=xs.device)
    else:
        w0, b0 = init[0].expand(t, -1, -1), init[1].expand(t, -1)
    return adapt(prepare(xs, loop), ys, w0, b0, loop)


@torch.no_grad()
def evaluate_features(
    features: torch.Tensor,
    sampler: EpisodeSampler,
    episodes: int,
    method: str,
    *,
    loop: InnerLoop | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int = 500,
    progress: bool = False,
    ids: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-episode query accuracy [E] for episodes 0..episodes-1 (or `ids`) over a feature matrix [N, d]."""
    all_ids = np.arange(episodes) if ids is None else np.asarray(ids)
    way, shot, query = sampler.way, sampler.shot, sampler.query
    accs = []
    bar = track(len(all_ids), "episodes", "ep", leave=False, enabled=progress)
    try:
        for start in range(0, len(all_ids), chunk):
            batch = episode_batch(sampler, all_ids[start : start + chunk])
            e = len(batch.ids)
            xs = features[torch.from_numpy(batch.support)]
            xq = features[torch.from_numpy(batch.query)]
            ys = episode_labels(way, shot, e, xs.device)
            yq = episode_labels(way, query, e, xs.device)
            scores = classify(xs, ys, xq, way, method, loop, init)
            accs.append((scores.argmax(-1) == yq).float().mean(1).cpu().numpy())
            bar.update(e)
    finally:
        bar.close()
    return np.concatenate(accs) if accs else np.empty(0)


def confidence_interval(accuracies: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% CI) of per-episode accuracies: 1.96 * std / sqrt(n), std with ddof=0."""
    a = np.asarray(accuracies, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no episodes to summarise")
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(a.size))


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(mean, half-width of the 95% CI) of a - b for two methods' accuracies on the same episodes [E].

    Episode difficulty is shared by both methods, so the per-episode difference varies far less than
    either accuracy: this CI, not two overlapping ones, says whether a - b differs from 0.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired accuracies need the same episodes; got shapes {x.shape} and {y.shape}")
    return confidence_interval(x - y)


def format_delta(mean: float, ci: float) -> str:
    """`+1.23 ± 0.17` in accuracy points, for a paired difference."""
    return f"{100 * mean:+.2f} ± {100 * ci:.2f}"


def format_accuracy(mean: float, ci: float, episodes: int, way: int, shot: int, split: str) -> str:
    """The one-line report `accuracy: 61.20 ± 0.80 % (95% CI, 600 episodes, 5-way 1-shot, test split)`."""
    return (
        f"accuracy: {100 * mean:.2f} ± {100 * ci:.2f} % "
        f"(95% CI, {episodes} episodes, {way}-way {shot}-shot, {split} split)"
    )

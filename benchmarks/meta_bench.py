"""Meta-training and meta-test: the original loop (``reference.py``) against the project's own functions.

- meta-train: tasks/s of ``reference_meta_task`` (one task per Adam step) against
  ``MetaTrainer.learn`` (the project's real step, a meta-batch of tasks);
- meta-test: episodes/s; the reference runs the encoder per episode, the project extracts the
  features of the whole pool once (counted in its time) and runs ``evaluate_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from fixtures import (
    QUERY,
    SHOT,
    WAY,
    Net,
    Target,
    episode_tensors,
    meta_config,
    meta_models,
    random_store,
)
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import ImageStore
from metatransfer.models.meta_learner import inner_loop
from metatransfer.train.evaluate import evaluate_features, extract_features
from metatransfer.train.meta import MetaTrainer, TaskBatch

# Run as a script, so this folder is on sys.path and reference.py imports as a top-level module.
from reference import reference_meta_task, reference_test_episode
from timing import Row, alternate, rate, seconds


@dataclass(frozen=True)
class MetaTrainCase:
    net: Net
    meta_batch: int
    inner_steps: int  # both paths (the original code's update_step)
    # torch.compile as the matching config sets it: on for 84 px (configs/mini-imagenet.yaml), where it
    # fuses the memory-bound SS/BN/activation passes; off for small inputs, where it did not pay.
    compile: bool = False
    shot: int = SHOT
    per_round: int = 1  # reference tasks and project meta-batches per round (more for small nets)


@dataclass(frozen=True)
class MetaTrainResult:
    row: Row
    warm_up_s: float  # the project's first meta-batch (with torch.compile's one-time cost, if compiling)
    step_s: float  # median seconds of one project meta-batch


def meta_train(case: MetaTrainCase, target: Target, rounds: int) -> MetaTrainResult:
    """Per round: ``per_round`` reference tasks, then ``per_round`` project meta-batches of
    ``case.meta_batch`` tasks."""
    meta = meta_config(case.meta_batch, case.inner_steps, case.shot)
    cfg, runtime = target.runtime(meta, compile=case.compile)
    net, device = case.net, runtime.device
    store = random_store(16, QUERY + case.shot + 4, net.size, net.channels, "train")
    pre = net.preprocess()
    learner, encoder, theta, opt = meta_models(net, meta, runtime)
    trainer = MetaTrainer(cfg, learner, store, pre, runtime)
    sampler = trainer.sampler
    n, t = case.per_round, meta.meta_batch
    tasks = [
        episode_tensors(store, sampler.episode(i), pre, device, case.shot) for i in range((rounds + 1) * n)
    ]
    batches = [
        TaskBatch.of([sampler.episode(i) for i in range(j * t, (j + 1) * t)]) for j in range((rounds + 1) * n)
    ]

    def reference_round(k: int) -> float:
        def run() -> None:
            for task in tasks[k * n : (k + 1) * n]:
                reference_meta_task(encoder, theta, opt, task, case.inner_steps, meta.inner_lr)

        return rate(n, run, device)

    def project_round(k: int) -> float:
        def run() -> None:
            for j in range(k * n, (k + 1) * n):
                trainer.learn(batches[j], step_seed=j, total=t)

        return rate(n * t, run, device)

    out = alternate(reference_round, project_round, rounds)
    mode = "torch.compile, its one-time cost in the warm-up round" if case.compile else "eager"
    row = Row(
        "meta-train",
        f"meta-train {net.label}, {WAY}-way {case.shot}-shot {QUERY}q, {case.inner_steps} inner steps",
        "tasks/s",
        tuple(out.reference),
        tuple(out.project),
        f"per round {n} reference task(s) (one per Adam step) and {n} MetaTrainer.learn meta-batch(es) of "
        f"{t} tasks ({runtime.precision}, first-order, {mode})",
    )
    step_s = t / float(np.median(out.project))
    return MetaTrainResult(row, n * t / out.warm_up[1], step_s)


@dataclass(frozen=True)
class MetaTestCase:
    net: Net
    pool_classes: int
    pool_per_class: int
    reference_episodes: int  # timed reference episodes per round
    episodes: tuple[int, ...]  # the project's episode counts, each timed in every round
    inner_steps: int


@dataclass(frozen=True)
class MetaTestResult:
    rows: list[Row]
    features_per_s: float  # median images/s of the project's feature extraction
    episodes_per_s: dict[int, float]  # median episodes/s of evaluate_features alone, per count


def meta_test(
    case: MetaTestCase, target: Target, rounds: int, pool: ImageStore | None = None
) -> MetaTestResult:
    """Per round: ``reference_episodes`` reference episodes, then the project's features of the whole
    pool and each count of episodes over them. ``pool`` defaults to random images of the case's shape."""
    net = case.net
    meta = meta_config(4, case.inner_steps)
    _, runtime = target.runtime()
    device = runtime.device
    if pool is None:
        pool = random_store(case.pool_classes, case.pool_per_class, net.size, net.channels, "test", seed=1)
    pre = net.preprocess()
    learner, encoder, theta, _ = meta_models(net, meta, runtime)
    learner.eval()
    sampler = EpisodeSampler(pool, WAY, SHOT, QUERY, seed=0)
    n = case.reference_episodes
    episodes = [episode_tensors(pool, sampler.episode(i), pre, device) for i in range((rounds + 1) * n)]
    loop, init = inner_loop(meta, test=True), learner.frozen_init(WAY)

    def reference_round(k: int) -> float:
        group = episodes[k * n : (k + 1) * n]

        def run() -> None:
            for task in group:
                reference_test_episode(encoder, theta, task, case.inner_steps, meta.inner_lr)

        return rate(len(group), run, device)

    def project_round(k: int) -> tuple[float, dict[int, float]]:
        """(features seconds, {count: evaluate_features seconds}). The warm-up round extracts 64 images
        and runs a few episodes over stand-in features of the pool's shape."""
        if k == 0:
            seconds(lambda: extract(np.arange(min(64, len(pool)))), device)
            stand_in = torch.randn(len(pool), int(learner.backbone.out_dim))  # type: ignore[arg-type]
            evaluate_features(stand_in, sampler, 20, "linear", loop=loop, init=init)
            return 0.0, {}
        feats: list[torch.Tensor] = []
        feat_s = seconds(lambda: feats.append(extract(None)), device)
        return feat_s, {c: seconds(partial(episodes_over, feats[0], c), device) for c in case.episodes}

    def episodes_over(features: torch.Tensor, count: int) -> np.ndarray:
        return evaluate_features(features, sampler, count, "linear", loop=loop, init=init)

    def extract(rows: np.ndarray | None) -> torch.Tensor:
        return extract_features(learner.backbone, pool, runtime, pre.mean, pre.std, indices=rows)

    out = alternate(reference_round, project_round, rounds)
    feat_s = [f for f, _ in out.project]
    rows = []
    for count in case.episodes:
        eval_s = [e[count] for _, e in out.project]
        rows.append(
            Row(
                "meta-test",
                f"meta-test {count:,} episodes, {net.label}, {WAY}-way {SHOT}-shot {QUERY}q, {case.inner_steps} steps",
                "episodes/s",
                tuple(out.reference),
                tuple(count / (f + e) for f, e in zip(feat_s, eval_s, strict=True)),
                f"per round {n} reference episodes (encoder per episode; its rate stands for any count) and "
                f"the project's features of the {len(pool):,}-image pool (median {np.median(feat_s):.1f} s, "
                f"{runtime.precision}) + {count:,} episodes of batched inner loops (median {np.median(eval_s):.1f} s)",
            )
        )
    return MetaTestResult(
        rows,
        features_per_s=len(pool) / float(np.median(feat_s)),
        episodes_per_s={c: c / float(np.median([e[c] for _, e in out.project])) for c in case.episodes},
    )

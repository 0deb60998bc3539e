"""Side-by-side speed of this project's paths and the original MTL loop, in one process and one run.

Usage: ``python benchmarks/run.py --out benchmarks/results [--quick] [--threads N] [--only SECTION,...]``.

Every figure is measured in this run for both paths, on the same backbone, task shape and random
data (uint8 images, so the result does not depend on any dataset being present):

- meta-train: tasks/s of ``reference.reference_meta_task`` (the original loop, one task per update)
  against ``metatransfer.train.meta.MetaTrainer.learn`` (the project's real step, meta-batch of tasks);
- meta-test: episodes/s over 600 and 10,000 episodes; the reference runs the encoder per episode
  (timed on a subset and extrapolated, said so in the table), the project extracts the features of the
  whole pool once (counted in its time) and runs ``evaluate_features``;
- pre-train: images/s of a plain fp32 step against the project's step (uint8 -> float, batched
  augmentation, autocast, channels_last);
- flops: GFLOP/s of the backbone's forward+backward (FLOPs from ``torch.utils.flop_counter``) against a
  matmul peak measured in this run, fp32 and bf16, plus a profile of the bf16 step.

Writes ``bench.md`` and ``bench.json`` (and ``profile_bf16_step.txt``) into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metatransfer.config import AugmentConfig, Config, MetaConfig
from metatransfer.data.augment import BatchAugment, to_float
from metatransfer.data.preprocess import Preprocess
from metatransfer.data.sampler import Episode, EpisodeSampler
from metatransfer.data.store import ImageStore
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, inner_loop, prepare_backbone
from metatransfer.models.scale_shift import convert_to_ss
from metatransfer.train.evaluate import episode_labels, evaluate_features, extract_features
from metatransfer.train.meta import MetaTrainer, TaskBatch
from metatransfer.train.pretrain import Classifier

# Run as a script, so this folder is on sys.path and reference.py imports as a top-level module.
from reference import reference_meta_task, reference_pretrain_step, reference_test_episode

T = TypeVar("T")
U = TypeVar("U")
SECTIONS = ("flops", "pretrain", "meta-train", "meta-test")
WAY, SHOT, QUERY = 5, 1, 15
INNER_STEPS = 100  # meta-train and meta-test, both paths (the original code's update_step)
PRETRAIN_CLASSES = 64  # miniImageNet's train split
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class Net:
    """A backbone at an input size: ``create_backbone(name, channels, **args)`` fed size x size images."""

    name: str
    size: int
    channels: int = 3
    args: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        widths = self.args.get("widths")
        extra = f" {'-'.join(str(w) for w in widths)}" if isinstance(widths, Sequence) else ""
        return f"{self.name}{extra} {self.size}px"

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)  # both paths start from the same weights
        return create_backbone(self.name, self.channels, **self.args)


@dataclass(frozen=True)
class MetaTrainCase:
    net: Net
    reference_tasks: int  # timed, after one warm-up task
    project_batches: int  # timed meta-batches, after one warm-up meta-batch
    # torch.compile as the matching config sets it: on for 84 px (configs/mini-imagenet.yaml), where it
    # fuses the memory-bound SS/BN/activation passes; off for small inputs, where it did not pay.
    compile: bool = False


@dataclass(frozen=True)
class PretrainCase:
    net: Net
    batch: int
    steps: int  # timed steps per path, after one warm-up step


@dataclass(frozen=True)
class Plan:
    meta_batch: int
    meta_train: tuple[MetaTrainCase, ...]
    test_net: Net
    pool_classes: int
    pool_per_class: int
    reference_episodes: int  # timed reference episodes, after one warm-up
    test_episodes: tuple[int, ...]
    pretrain: tuple[PretrainCase, ...]
    flops_net: Net
    flops_batch: int
    flops_steps: int
    peak_n: int


RESNET12 = "resnet12"
FULL = Plan(
    meta_batch=4,
    meta_train=(
        MetaTrainCase(Net(RESNET12, 84), reference_tasks=2, project_batches=2, compile=True),
        MetaTrainCase(Net(RESNET12, 32), reference_tasks=4, project_batches=3),
        MetaTrainCase(Net("conv4", 28, channels=1), reference_tasks=8, project_batches=4),
    ),
    # CIFAR-FS's test split has this shape: 20 classes x 600 images at 32 px.
    test_net=Net(RESNET12, 32),
    pool_classes=20,
    pool_per_class=600,
    reference_episodes=12,
    test_episodes=(600, 10_000),
    pretrain=(PretrainCase(Net(RESNET12, 84), batch=32, steps=3), PretrainCase(Net(RESNET12, 32), 128, 3)),
    flops_net=Net(RESNET12, 84),
    flops_batch=32,
    flops_steps=3,
    peak_n=2048,
)
QUICK = Plan(
    meta_batch=4,
    meta_train=(
        MetaTrainCase(Net(RESNET12, 32), reference_tasks=1, project_batches=1),
        MetaTrainCase(Net("conv4", 28, channels=1), reference_tasks=2, project_batches=1),
    ),
    test_net=Net(RESNET12, 32, args={"widths": [32, 64, 128, 256]}),
    pool_classes=20,
    pool_per_class=40,
    reference_episodes=2,
    test_episodes=(600, 2_000),
    pretrain=(PretrainCase(Net(RESNET12, 32), batch=32, steps=1),),
    flops_net=Net(RESNET12, 32),
    flops_batch=32,
    flops_steps=1,
    peak_n=1024,
)


@dataclass(frozen=True)
class Row:
    """One line of the table: the same figure for the reference loop and for the project."""

    section: str
    figure: str
    unit: str
    reference: float
    project: float
    note: str = ""
    ratio: bool = True  # False where project/reference is not a speed-up (e.g. % of two different peaks)

    @property
    def speedup(self) -> float | None:
        return self.project / self.reference if self.ratio and self.reference > 0 else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clock(fn: Callable[[T], object], items: Sequence[T]) -> float:
    """Wall seconds for calling ``fn`` on each of ``items`` in turn (the caller warms up first)."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - start


def alternate(
    first: Callable[[T], object],
    first_items: Sequence[T],
    second: Callable[[U], object],
    second_items: Sequence[U],
) -> tuple[float, float]:
    """Total wall seconds of ``first`` over its items and of ``second`` over its items, called in turns.

    Interleaving (first, second, first, ...) makes bursts of load from other processes on a shared
    machine fall on both paths alike instead of on whichever ran second.
    """
    totals = [0.0, 0.0]
    for i in range(max(len(first_items), len(second_items))):
        if i < len(first_items):
            totals[0] += clock(first, [first_items[i]])
        if i < len(second_items):
            totals[1] += clock(second, [second_items[i]])
    return totals[0], totals[1]


def random_store(
    classes: int, per_class: int, size: int, channels: int, split: str, seed: int = 0
) -> ImageStore:
    """A class-major ImageStore of random uint8 images [classes * per_class, size, size, channels]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(classes * per_class, size, size, channels), dtype=np.uint8)
    offsets = np.arange(classes + 1, dtype=np.int64) * per_class
    return ImageStore.from_offsets(images, offsets, [f"class{c:03d}" for c in range(classes)], split)


def project_runtime(
    threads: int, meta: MetaConfig | None = None, compile: bool = False
) -> tuple[Config, Runtime]:
    """The project's default runtime on this machine (precision "auto": bf16 where the CPU has it)."""
    cfg = Config(
        device="cpu",
        precision="auto",
        channels_last=True,
        threads=threads,
        compile=compile,
        meta=meta or MetaConfig(),
    )
    return cfg, resolve_runtime(cfg)


def preprocess(net: Net) -> Preprocess:
    return Preprocess(net.size, net.channels, MEAN[: net.channels], STD[: net.channels])


def episode_tensors(
    store: ImageStore, episode: Episode, pre: Preprocess
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's input for one episode: fp32 (xs, ys, xq, yq), as its data loader would hand it over."""

    def images(rows: np.ndarray) -> torch.Tensor:
        return to_float(torch.from_numpy(np.ascontiguousarray(store.images[rows])), pre.mean, pre.std)

    ys, yq = episode_labels(WAY, SHOT, 1)[0], episode_labels(WAY, QUERY, 1)[0]
    return images(episode.support), ys, images(episode.query), yq


def meta_config(meta_batch: int) -> MetaConfig:
    return MetaConfig(
        way=WAY,
        shot=SHOT,
        query=QUERY,
        meta_batch=meta_batch,
        inner_steps=INNER_STEPS,
        inner_steps_test=INNER_STEPS,
    )


def reference_learner(
    backbone: nn.Module, learner: MetaLearner, meta: MetaConfig
) -> tuple[nn.Module, list[torch.Tensor], torch.optim.Optimizer]:
    """The original's model from the pre-trained ``backbone`` (not yet in SS form): an fp32, contiguous
    copy with the original's SS convolutions and theta = [W, b] (the learner's values), with the
    original's Adam over the SS parameters and theta.

    The original (``Conv2dMtl``) scales kernel-wise and multiplies the scale into the weight,
    ``conv(x, W * s)``, so its backward runs the weight-gradient convolution; ``granularity="kernel"``
    is exactly that form. The project scales filter-wise (the paper's choice) and applies the scale to
    the conv output, which skips that convolution.
    """
    encoder = copy.deepcopy(backbone).float().to(memory_format=torch.contiguous_format).eval()
    convert_to_ss(encoder, layers="all", granularity="kernel", train_bn=meta.bn == "train")
    theta: list[torch.Tensor] = [
        nn.Parameter(learner.theta_weight.detach().clone()),
        nn.Parameter(learner.theta_bias.detach().clone()),
    ]
    ss = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": ss, "lr": meta.lr_ss}, {"params": theta, "lr": meta.lr_theta}])
    return encoder, theta, opt


def meta_models(
    net: Net, meta: MetaConfig, runtime: Runtime
) -> tuple[MetaLearner, nn.Module, list[torch.Tensor], torch.optim.Optimizer]:
    """The project's MetaLearner (SS backbone, on the runtime) and the reference's model of the same weights."""
    pretrained = net.build()
    backbone = copy.deepcopy(pretrained)
    prepare_backbone(backbone, meta)
    learner = MetaLearner(backbone, WAY)
    encoder, theta, opt = reference_learner(pretrained, learner, meta)
    runtime.model(learner)
    return learner, encoder, theta, opt


def bench_meta_train(plan: Plan, threads: int) -> list[Row]:
    """Tasks/s: the original loop (one task per Adam step) vs ``MetaTrainer.learn`` on meta-batches."""
    return [meta_train_case(case, meta_config(plan.meta_batch), threads) for case in plan.meta_train]


def meta_train_case(case: MetaTrainCase, meta: MetaConfig, threads: int) -> Row:
    cfg, runtime = project_runtime(threads, meta, compile=case.compile)
    net = case.net
    store = random_store(16, QUERY + SHOT + 4, net.size, net.channels, "train")
    pre = preprocess(net)
    learner, encoder, theta, opt = meta_models(net, meta, runtime)
    trainer = MetaTrainer(cfg, learner, store, pre, runtime)
    sampler = trainer.sampler
    tasks = [episode_tensors(store, sampler.episode(i), pre) for i in range(case.reference_tasks + 1)]

    def reference_task(task: tuple[torch.Tensor, ...]) -> None:
        xs, ys, xq, yq = task
        reference_meta_task(encoder, theta, opt, (xs, ys, xq, yq), INNER_STEPS, meta.inner_lr)

    def project_batch(step: int) -> None:
        ids = range(step * meta.meta_batch, (step + 1) * meta.meta_batch)
        trainer.learn(TaskBatch.of([sampler.episode(i) for i in ids]), step_seed=step, total=meta.meta_batch)

    log(
        f"meta-train {net.label}: 1 warm-up each, then {case.reference_tasks} reference tasks and "
        f"{case.project_batches} project meta-batches of {meta.meta_batch}, interleaved"
    )
    reference_task(tasks[0])
    warm_up_s = clock(project_batch, [0])  # includes torch.compile's one-time cost, if compiling
    ref_s, proj_s = alternate(reference_task, tasks[1:], project_batch, range(1, case.project_batches + 1))
    ref_rate, proj_rate = case.reference_tasks / ref_s, case.project_batches * meta.meta_batch / proj_s
    log(f"  reference {ref_rate:.3f} tasks/s, project {proj_rate:.3f} tasks/s")
    mode = (
        f"torch.compile: one-time {warm_up_s:.0f} s for compiling and the first meta-batch, not counted"
        if case.compile
        else "eager"
    )
    return Row(
        "meta-train",
        f"meta-train {net.label}, {WAY}-way {SHOT}-shot {QUERY}q, {INNER_STEPS} inner steps",
        "tasks/s",
        ref_rate,
        proj_rate,
        f"reference: {case.reference_tasks} tasks, one per Adam step; project: MetaTrainer.learn, "
        f"{case.project_batches} meta-batches of {meta.meta_batch} tasks ({runtime.precision}, first-order, {mode})",
    )


def bench_meta_test(plan: Plan, threads: int) -> list[Row]:
    """Episodes/s: per-episode encoder + autograd inner loop vs cached features + batched inner loops."""
    net = plan.test_net
    meta = meta_config(plan.meta_batch)
    _, runtime = project_runtime(threads)
    pool = random_store(plan.pool_classes, plan.pool_per_class, net.size, net.channels, "test", seed=1)
    pre = preprocess(net)
    learner, encoder, theta, _ = meta_models(net, meta, runtime)
    learner.eval()
    sampler = EpisodeSampler(pool, WAY, SHOT, QUERY, seed=0)
    episodes = [episode_tensors(pool, sampler.episode(i), pre) for i in range(plan.reference_episodes + 1)]

    def reference_episode(task: tuple[torch.Tensor, ...]) -> None:
        xs, ys, xq, yq = task
        reference_test_episode(encoder, theta, (xs, ys, xq, yq), INNER_STEPS, meta.inner_lr)

    loop, init = inner_loop(meta, test=True), learner.frozen_init(WAY)
    features: list[torch.Tensor] = []

    def project_stage(count: int) -> None:
        """0: features of the whole pool; n > 0: n episodes over them."""
        if count == 0:
            features.append(extract_features(learner.backbone, pool, runtime, pre.mean, pre.std))
        else:
            evaluate_features(features[0], sampler, count, "linear", loop=loop, init=init)

    log(
        f"meta-test {net.label}: 1 warm-up each, then {plan.reference_episodes} reference episodes interleaved "
        f"with the project's features of {len(pool)} images and its {plan.test_episodes} episodes"
    )
    reference_episode(episodes[0])
    extract_features(learner.backbone, pool, runtime, pre.mean, pre.std, indices=np.arange(64))
    stages = [0, *plan.test_episodes]
    per_stage = -(-plan.reference_episodes // len(stages))
    groups = [episodes[1 + i : 1 + i + per_stage] for i in range(0, plan.reference_episodes, per_stage)]
    stage_s: list[float] = []
    ref_s, _ = alternate(
        lambda group: clock(reference_episode, group),
        groups,
        lambda stage: stage_s.append(clock(project_stage, [stage])),
        stages,
    )
    ref_rate = plan.reference_episodes / ref_s
    feat_s = stage_s[0]
    log(f"  reference {ref_rate:.3f} episodes/s; project features {feat_s:.1f} s")
    rows = []
    for count, eval_s in zip(plan.test_episodes, stage_s[1:], strict=True):
        proj_rate = count / (feat_s + eval_s)
        log(f"  {count} episodes: {eval_s:.1f} s after features -> {proj_rate:.2f} episodes/s")
        measured = (
            "measured" if count <= plan.reference_episodes else f"extrapolated from {plan.reference_episodes}"
        )
        rows.append(
            Row(
                "meta-test",
                f"meta-test {count:,} episodes, {net.label}, {WAY}-way {SHOT}-shot {QUERY}q, {INNER_STEPS} steps",
                "episodes/s",
                ref_rate,
                proj_rate,
                f"reference: {measured} episodes (encoder per episode); project: features of the "
                f"{len(pool):,}-image pool once ({feat_s:.1f} s, {runtime.precision}) + {eval_s:.1f} s of "
                "batched inner loops",
            )
        )
    return rows


def bench_pretrain(plan: Plan, threads: int) -> list[Row]:
    """Images/s of a pre-training step: plain fp32 vs the project's (uint8 -> augment -> autocast)."""
    return [pretrain_case(case, threads) for case in plan.pretrain]


def pretrain_case(case: PretrainCase, threads: int) -> Row:
    _, runtime = project_runtime(threads)
    net, b = case.net, case.batch
    pre = preprocess(net)
    store = random_store(PRETRAIN_CLASSES, 2 * b // PRETRAIN_CLASSES + 1, net.size, net.channels, "train")
    model = Classifier(net.build(), PRETRAIN_CLASSES)
    reference = copy.deepcopy(model).train()
    runtime.model(model)
    model.train()
    aug = AugmentConfig()
    augment = BatchAugment(
        size=pre.size,
        channels=pre.channels,
        crop_scale=(aug.crop_scale[0], aug.crop_scale[1]),
        flip=aug.flip,
        color_jitter=aug.color_jitter,
    ).to(runtime.device)
    ref_opt, opt = sgd(reference), sgd(model)
    gen = torch.Generator().manual_seed(0)
    batches = [
        np.sort(np.random.default_rng(s).choice(len(store), b, replace=False)) for s in range(case.steps + 1)
    ]
    ref_batches = [
        (to_float(torch.from_numpy(store.images[r]), pre.mean, pre.std), torch.from_numpy(store.labels[r]))
        for r in batches
    ]

    def reference_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        reference_pretrain_step(reference, ref_opt, *batch)

    def project_step(rows: np.ndarray) -> None:
        # The body of the step loop in metatransfer.train.pretrain.pretrain, with the same project calls.
        x = to_float(torch.from_numpy(np.ascontiguousarray(store.images[rows])), pre.mean, pre.std)
        y = torch.from_numpy(store.labels[rows]).to(runtime.device)
        x = augment(runtime.images(x), generator=gen)
        with runtime.autocast():
            scores = model(x)
            loss = F.cross_entropy(scores.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())

    log(f"pre-train {net.label} batch {b}: 1 warm-up + {case.steps} steps each, interleaved")
    reference_step(ref_batches[0])
    project_step(batches[0])
    ref_s, proj_s = alternate(reference_step, ref_batches[1:], project_step, batches[1:])
    ref_rate, proj_rate = b * case.steps / ref_s, b * case.steps / proj_s
    log(f"  reference {ref_rate:.1f} images/s, project {proj_rate:.1f} images/s")
    return Row(
        "pre-train",
        f"pre-train {net.label}, batch {b}",
        "images/s",
        ref_rate,
        proj_rate,
        f"project includes uint8->float and batched augmentation ({runtime.precision}, channels_last); "
        "the reference gets ready fp32 tensors",
    )


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The pre-training optimizer (the project's defaults; the lr does not change the speed)."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def matmul_peak(n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n ``torch.mm`` in ``dtype`` over ``repeats`` runs (after a warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(clock(lambda _: torch.mm(a, b), [None]) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime | None) -> None:
    """Forward + backward of backbone + head (no optimizer): fp32 when ``runtime`` is None."""
    model.zero_grad(set_to_none=True)
    if runtime is None:
        loss = F.cross_entropy(model(x), y)
    else:
        with runtime.autocast():
            loss = F.cross_entropy(model(x).float(), y)
    loss.backward()


def bench_flops(plan: Plan, threads: int, out: Path) -> tuple[list[Row], dict[str, object]]:
    """Achieved GFLOP/s of the backbone's training step against the matmul peak, fp32 and project precision."""
    _, runtime = project_runtime(threads)
    net, b = plan.flops_net, plan.flops_batch
    log(f"flops: matmul peak at n={plan.peak_n}")
    peaks = [(matmul_peak(plan.peak_n, torch.float32), matmul_peak(plan.peak_n, torch.bfloat16))]
    log(f"  fp32 {peaks[0][0]:.0f} GFLOP/s, bf16 {peaks[0][1]:.0f} GFLOP/s")
    model = Classifier(net.build(), PRETRAIN_CLASSES).train()
    x = torch.randn(b, net.channels, net.size, net.size)
    y = torch.randint(0, PRETRAIN_CLASSES, (b,))
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, x, y, None)
    flops = counter.get_total_flops()
    log(f"  {net.label} batch {b}: {flops / 1e9:.1f} GFLOP per forward+backward; timing, interleaved")
    fast = copy.deepcopy(model)
    runtime.model(fast)
    xf = runtime.images(x)
    train_step(fast, xf, y, runtime)
    steps = range(plan.flops_steps)
    fp32_s, fast_s = alternate(
        lambda _: train_step(model, x, y, None), steps, lambda _: train_step(fast, xf, y, runtime), steps
    )
    fp32_s, fast_s = fp32_s / plan.flops_steps, fast_s / plan.flops_steps
    # The best of peaks measured before and after the steps, so a burst of load cannot lower it.
    peaks.append((matmul_peak(plan.peak_n, torch.float32), matmul_peak(plan.peak_n, torch.bfloat16)))
    peak32, peak16 = max(p[0] for p in peaks), max(p[1] for p in peaks)
    log(f"  peaks after: fp32 {peaks[1][0]:.0f} GFLOP/s, bf16 {peaks[1][1]:.0f} GFLOP/s")
    fast_peak = peak16 if runtime.amp_dtype == torch.bfloat16 else peak32
    g32, g16 = flops / fp32_s / 1e9, flops / fast_s / 1e9
    log(
        f"  fp32 {g32:.0f} GFLOP/s, {runtime.precision} {g16:.0f} GFLOP/s; profiling one {runtime.precision} step"
    )
    profile = profile_step(
        lambda: train_step(fast, xf, y, runtime), out / f"profile_{runtime.precision}_step.txt"
    )
    # Nearly all counted FLOPs are convolutions: their GFLOP/s inside the conv kernels alone shows
    # how much of the gap to the peak is the convolutions and how much the ops around them.
    profile["convolution_gflops"] = flops / max(profile.pop("convolution_seconds"), 1e-9) / 1e9
    label = f"{net.label} batch {b} forward+backward"
    rows = [
        Row(
            "flops",
            "matmul peak (torch.mm), fp32 / bf16",
            "GFLOP/s",
            peak32,
            peak16,
            f"n={plan.peak_n}, best of 5 runs before and 5 after the steps",
            ratio=False,
        ),
        Row(
            "flops",
            f"{label}, achieved",
            "GFLOP/s",
            g32,
            g16,
            f"{flops / 1e9:.1f} GFLOP/step; reference fp32 contiguous, project {runtime.precision} channels_last",
        ),
        Row(
            "flops",
            f"{label}, % of own matmul peak",
            "%",
            100 * g32 / peak32,
            100 * g16 / fast_peak,
            f"reference vs fp32 peak, project vs {'bf16' if fast_peak == peak16 else 'fp32'} peak",
            ratio=False,
        ),
    ]
    return rows, {"gflop_per_step": flops / 1e9, "profile": profile}


PROFILE_FAMILIES = {  # op-name fragments; an op counts in the first family it matches
    "convolution": ("convolution",),
    "batch_norm": ("batch_norm",),
    "activation": ("relu", "threshold"),
    "max_pool": ("max_pool",),
    "copies_and_casts": ("copy_", "to_copy", "contiguous", "clone"),
}


def profile_step(step: Callable[[], None], path: Path) -> dict[str, float]:
    """Profile one call of ``step``; writes the top ops to ``path``.

    Returns each op family's share of the self CPU time in percent, plus ``convolution_seconds``.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    path.write_text(events.table(sort_by="self_cpu_time_total", row_limit=25))
    total = sum(e.self_cpu_time_total for e in events)
    spent = dict.fromkeys([*PROFILE_FAMILIES, "other"], 0.0)
    for e in events:
        family = next((f for f, keys in PROFILE_FAMILIES.items() if any(k in e.key for k in keys)), "other")
        spent[family] += e.self_cpu_time_total
    shares = {f: 100 * t / total if total else 0.0 for f, t in spent.items()}
    return {**shares, "convolution_seconds": spent["convolution"] / 1e6}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's machine name."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def markdown(rows: Sequence[Row], info: dict[str, object]) -> str:
    lines = [
        "| figure | unit | reference (original loop) | project | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r.speedup:.1f}x" if r.speedup is not None else "—"
        lines.append(f"| {r.figure} | {r.unit} | {fmt(r.reference)} | {fmt(r.project)} | {speed} |")
    notes = [f"- {r.figure}: {r.note}" for r in rows if r.note]
    header = (
        f"Measured {info['date']} on {info['cpu']} ({info['threads']} threads, torch {info['torch']}, "
        f"project precision {info['precision']}); load average {info['load_before']} before, "
        f"{info['load_after']} after; whole run {info['seconds']:.0f} s{' (--quick)' if info['quick'] else ''}."
    )
    profile = info.get("profile")
    extra = []
    if isinstance(profile, dict):
        shares = ", ".join(
            f"{k} {v:.0f}%" for k, v in profile.items() if k in PROFILE_FAMILIES or k == "other"
        )
        extra = [
            "",
            f"Self CPU time of one {info['precision']} training step of the flops row (torch.profiler): {shares}; "
            f"inside the convolution kernels alone {profile['convolution_gflops']:.0f} GFLOP/s.",
        ]
    return "\n".join([header, "", *lines, "", "Notes:", *notes, *extra]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="folder for bench.md/json"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes and counts (< 2 min)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = OMP_NUM_THREADS or all cores)"
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    extra: dict[str, object] = {}
    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.perf_counter()
        if section == "flops":
            flop_rows, extra = bench_flops(plan, threads, args.out)
            rows += flop_rows
        elif section == "pretrain":
            rows += bench_pretrain(plan, threads)
        elif section == "meta-train":
            rows += bench_meta_train(plan, threads)
        else:
            rows += bench_meta_test(plan, threads)
        log(f"[{section}: {time.perf_counter() - t0:.0f} s]")
    _, runtime = project_runtime(threads)
    info: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "precision": runtime.precision,
        "quick": args.quick,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "seconds": time.perf_counter() - start,
        "inner_steps": INNER_STEPS,
        "meta_batch": plan.meta_batch,
        **extra,
    }
    table = markdown(rows, info)
    (args.out / "bench.md").write_text(table)
    payload = {"info": info, "rows": [{**asdict(r), "speedup": r.speedup} for r in rows]}
    (args.out / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

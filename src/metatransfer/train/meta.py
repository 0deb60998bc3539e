"""Phase 2: meta-transfer learning of the SS parameters Phi and the base learner's initialisation theta.

For each task the base learner starts from theta and takes `inner_steps` gradient steps on the
support features (inner loop); the query loss after them updates Phi (lr gamma_1) and theta
(lr gamma_2) with Adam (outer loop). The tasks of a meta-batch go through the backbone as one batch
and their inner loops run batched. With `meta.ht.enabled`, each meta-batch (or, with
`meta.ht.pool_batches` k > 1, every k-th) is followed by hard tasks built from the failure classes
(see `hard_tasks`).

Every random choice of step k (episodes, augmentation) is derived from (seed, k), so a run resumed
from a checkpoint continues exactly as an uninterrupted one.

With `meta.bn: batch`, BN normalises with each forward's batch statistics while meta-test and predict
use its running statistics, an exponential average over batches taken while Phi kept moving;
`meta.bn_recalibrate: N` re-estimates them at the end (`recalibrate_bn`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metatransfer import distributed as dist
from metatransfer import progress
from metatransfer.config import Config, load_config
from metatransfer.data.augment import to_float
from metatransfer.data.preprocess import Preprocess
from metatransfer.data.readers import with_data_root
from metatransfer.data.sampler import Episode, EpisodeSampler
from metatransfer.data.store import ImageStore, open_split
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.errors import UserError
from metatransfer.models.base_learner import (
    adapt,
    adapt_first_order,
    logits,
    per_class_accuracy,
    per_class_loss,
    prepare,
)
from metatransfer.models.meta_learner import MetaLearner, inner_loop, prepare_backbone
from metatransfer.models.model_files import (
    BACKBONE_FILE,
    MODEL_FILE,
    load_backbone,
    model_metadata,
    read_model_file,
    save_meta_model,
)
from metatransfer.models.scale_shift import describe_trainable
from metatransfer.report import safetensors_metadata
from metatransfer.runs import (
    CONFIG_FILE,
    DONE_FILE,
    RunDir,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    save_weights,
    write_json,
)
from metatransfer.train.evaluate import (
    confidence_interval,
    episode_labels,
    evaluate_features,
    extract_features,
)
from metatransfer.train.hard_tasks import failure_classes, hard_task_classes, pooled_task_classes
from metatransfer.train.loop import (
    METRICS_FILE,
    SUMMARY_FILE,
    ScaledOptimizer,
    Throughput,
    TrainingRun,
    check_finite,
    make_augment,
)

LAST_FILE = "last.safetensors"  # the end of meta-training
FAILURES_FILE = "failure_classes.csv"  # how often each class was a failure class (hard tasks)
HARD_SALT = 1  # hard tasks draw from their own episode stream, so HT leaves ordinary tasks unchanged


def store_images(store: ImageStore, rows: np.ndarray, pre: Preprocess, runtime: Runtime) -> torch.Tensor:
    """The store's images at `rows` (any shape, flattened) as a normalised batch on the runtime's device."""
    flat = rows.reshape(-1)
    x = to_float(torch.from_numpy(np.ascontiguousarray(store.images[flat])), pre.mean, pre.std)
    return runtime.images(x)


@dataclass
class TaskBatch:
    """T tasks as index arrays: classes [T, way], support [T, way*shot], query [T, way*query]."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    @classmethod
    def of(cls, episodes: Sequence[Episode]) -> TaskBatch:
        return cls(
            classes=np.stack([e.classes for e in episodes]),
            support=np.stack([e.support for e in episodes]),
            query=np.stack([e.query for e in episodes]),
        )

    def __len__(self) -> int:
        return len(self.classes)


@dataclass
class Learned:
    """A learned meta-batch, whole (every rank's tasks): its tasks and per-class query accuracy and loss
    [T, way], what hard tasks are built from."""

    batch: TaskBatch
    acc: np.ndarray
    loss: np.ndarray

    @classmethod
    def join(cls, parts: Sequence[Learned]) -> Learned:
        """The tasks of several meta-batches as one (the paper's pool of failure classes)."""

        def cat(arrays: Iterable[np.ndarray]) -> np.ndarray:
            return np.concatenate(list(arrays))

        batch = TaskBatch(*(cat(getattr(p.batch, f) for p in parts) for f in ("classes", "support", "query")))
        return cls(batch, cat(p.acc for p in parts), cat(p.loss for p in parts))

    def state(self) -> dict[str, torch.Tensor]:
        b = self.batch
        arrays = {
            "classes": b.classes,
            "support": b.support,
            "query": b.query,
            "acc": self.acc,
            "loss": self.loss,
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> Learned:
        n = {k: v.numpy() for k, v in s.items()}
        return cls(TaskBatch(n["classes"], n["support"], n["query"]), n["acc"], n["loss"])


class MetaTrainer:
    """One meta-training run's moving parts; `learn` makes one outer update on a batch of tasks, as
    `Pretrainer.step` learns one batch of images, and `next_meta_batch` learns the next meta-batch of
    the run (plus its hard tasks), counting `tasks_done` and `hard_done`."""

    def __init__(
        self, cfg: Config, learner: MetaLearner, train: ImageStore, pre: Preprocess, runtime: Runtime
    ):
        m = cfg.meta
        self.cfg, self.m, self.learner, self.train, self.pre, self.runtime = (
            cfg,
            m,
            learner,
            train,
            pre,
            runtime,
        )
        self.backbone_params = [p for p in learner.backbone.parameters() if p.requires_grad]
        groups = [{"params": [learner.theta_weight, learner.theta_bias], "lr": m.lr_theta}]
        if self.backbone_params:
            groups.append({"params": self.backbone_params, "lr": m.lr_ss})
        self.opt = torch.optim.Adam(groups)
        self.update = ScaledOptimizer(self.opt, runtime)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.sampler = EpisodeSampler(train, m.way, m.shot, m.query, cfg.seed)
        self.loop = inner_loop(m)
        self.augment = make_augment(cfg, pre, runtime.device) if m.augment else None
        # Only the query forward (the one with a backward) is compiled: it holds nearly all the time,
        # and the small no-grad support forward would cost a compile of its own.
        self._query_forward = runtime.compiled(learner.backbone)
        self.failures: Counter[int] = Counter()
        self.pool: list[Learned] = []  # meta-batches learned since the last hard tasks (ht.pool_batches)
        self.tasks_done = self.hard_done = 0
        self.losses: list[float] = []  # query loss and accuracy of each meta-batch since the last row
        self.accs: list[float] = []

    def _images(self, rows: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        x = store_images(self.train, rows, self.pre, self.runtime)
        return self.augment(x, generator=gen) if self.augment is not None else x

    def _features(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tasks: int
    ) -> torch.Tensor:
        """Images [tasks * n, C, H, W] through `forward` (the backbone, or its compiled query forward) ->
        float32 features [tasks, n, d]."""
        with self.runtime.autocast():
            f = forward(x)
        return f.float().reshape(tasks, -1, f.shape[-1])

    def learn(
        self, batch: TaskBatch, step_seed: int, total: int, where: str = "meta-training"
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """One outer update on the tasks of `batch`, this rank's share of an update over `total` tasks.

        Returns (mean query loss, per-class accuracy [T, way], per-class loss [T, way]).
        """
        t = len(batch)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.opt.zero_grad(set_to_none=True)
        if t == 0:  # fewer tasks than ranks (e.g. one hard task on two ranks): still join the all-reduce
            dist.all_reduce_grads(params)
            self.update.step()
            return float("nan"), np.zeros((0, self.m.way)), np.zeros((0, self.m.way))
        gen = torch.Generator(device=self.runtime.device).manual_seed(step_seed)
        # bn "batch" (the original code): BN normalises with each forward's batch statistics. Otherwise BN
        # keeps phase-1 statistics (its affine may still be meta-learned, bn "train").
        self.learner.backbone.train(self.m.bn == "batch")
        xs, xq = self._images(batch.support, gen), self._images(batch.query, gen)
        device = self.runtime.device
        ys, yq = (
            episode_labels(self.m.way, self.m.shot, t, device),
            episode_labels(self.m.way, self.m.query, t, device),
        )
        w0 = self.learner.theta_weight.expand(t, -1, -1)
        b0 = self.learner.theta_bias.expand(t, -1)
        # First order drops only the inner steps' derivatives: the support branch still needs a graph
        # when the prototype start is built from it (first-order Proto-MAML).
        with torch.set_grad_enabled(not self.m.first_order or self.loop.init == "proto"):
            fs = self._features(self.learner.backbone, xs, t)
        fit = adapt_first_order if self.m.first_order else adapt
        w, b = fit(prepare(fs, self.loop), ys, w0, b0, self.loop)
        fq = self._features(self._query_forward, xq, t)
        scores = logits(prepare(fq, self.loop), w, b, self.loop)
        loss = F.cross_entropy(scores.reshape(-1, self.m.way), yq.reshape(-1))
        check_finite(loss, where)
        # Each rank weighs its mean by its share of the tasks, so the all-reduced sum is the mean over all.
        self.update.backward(loss * (t / total))
        dist.all_reduce_grads(params)
        self.update.step()
        with torch.no_grad():
            acc = per_class_accuracy(scores, yq, self.m.way).cpu().numpy()
            cls_loss = per_class_loss(scores, yq, self.m.way).cpu().numpy()
        return float(loss.detach()), acc, cls_loss

    def next_meta_batch(self) -> tuple[float, float]:
        """Learn the next meta-batch (this rank's share of its tasks), then its hard tasks when HT is on.

        Episodes and augmentation of meta-batch k come from (seed, k), so a resumed run continues
        exactly. Returns (mean query loss, mean query accuracy) of the ordinary tasks on this rank.
        """
        m = self.m
        step_seed = self.cfg.seed * 1_000_003 + 2 * (self.tasks_done // m.meta_batch)
        self.set_lr(self.tasks_done)
        mine = dist.rank_share(list(range(self.tasks_done, self.tasks_done + m.meta_batch)))
        batch = TaskBatch.of([self.sampler.episode(i) for i in mine])
        where = f"meta-training task {self.tasks_done + 1}"
        loss, acc, cls_loss = self.learn(batch, step_seed=step_seed, total=m.meta_batch, where=where)
        self.tasks_done += m.meta_batch
        if m.ht.enabled and self.tasks_done > m.ht.start_after:
            whole = TaskBatch(*(dist.gather_rows(a) for a in (batch.classes, batch.support, batch.query)))
            self.pool.append(Learned(whole, dist.gather_rows(acc), dist.gather_rows(cls_loss)))
            if len(self.pool) == m.ht.pool_batches:
                pooled = Learned.join(self.pool)
                self.pool.clear()
                hard = self.hard_batch(pooled.batch, pooled.acc, pooled.loss, self.hard_done)
                share = TaskBatch(*(dist.rank_share(a) for a in (hard.classes, hard.support, hard.query)))
                where = f"hard task {self.hard_done + 1}"
                self.learn(share, step_seed=step_seed + 1, total=len(hard), where=where)
                self.hard_done += len(hard)
        self.losses.append(loss)
        self.accs.append(float(acc.mean()))
        return self.losses[-1], self.accs[-1]

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the step: weights, optimiser and loss scale, counters, failures."""
        return {
            "model": self.learner.state_dict(),
            **self.update.state_dict(),
            "tasks": self.tasks_done,
            "hard": self.hard_done,
            "failures": {str(k): v for k, v in self.failures.items()},
            "ht_pool": [p.state() for p in self.pool],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["model"]) - set(self.learner.state_dict()):
            # A checkpoint from before bn "batch" dropped the dead SS shifts: Adam's state is laid out
            # for them, so the run cannot continue exactly.
            raise UserError(
                "this unfinished run was checkpointed by an older metatransfer (SS shifts before "
                "batch-statistics BN); finish it with that version or start again with --overwrite"
            )
        self.learner.load_state_dict(state["model"])
        self.update.load_state_dict(state)
        self.tasks_done, self.hard_done = int(state["tasks"]), int(state["hard"])
        self.failures = Counter({int(k): int(v) for k, v in state["failures"].items()})
        self.pool = [Learned.from_state(p) for p in state.get("ht_pool", [])]

    def describe(self) -> str:
        m = self.m
        return (
            f"meta-training '{m.method}' {m.way}-way {m.shot}-shot, {m.tasks} tasks in meta-batches of {m.meta_batch}"
            f"{' + hard tasks' if m.ht.enabled else ''}; {describe_trainable(self.learner)}"
        )

    def recent(self) -> dict[str, str]:
        """Mean query loss and accuracy of the last 50 meta-batches, for a progress bar."""
        return {"loss": f"{np.mean(self.losses[-50:]):.3f}", "acc": f"{np.mean(self.accs[-50:]):.3f}"}

    def progress_row(self, tasks_per_s: float) -> dict[str, float | int]:
        """A metrics row with the mean query loss and accuracy since the last row (which it then forgets)."""
        row: dict[str, float | int] = {
            "step": self.tasks_done,
            "tasks": self.tasks_done,
            "hard_tasks": self.hard_done,
            "train_loss": float(np.mean(self.losses)),
            "train_query_acc": float(np.mean(self.accs)),
            "tasks_per_s": tasks_per_s,
        }
        self.losses.clear()
        self.accs.clear()
        if self.update.scaler.is_enabled():
            row["skipped_steps"] = self.update.take_skipped()  # fp16 steps with inf/NaN gradients
        return row

    def progress_line(self, row: dict[str, float | int]) -> str:
        top = ", ".join(f"{self.train.classes[c]}x{n}" for c, n in self.failures.most_common(10))
        return (
            f"tasks {row['tasks']}/{self.m.tasks} (+{row['hard_tasks']} hard): query acc {100 * row['train_query_acc']:.1f}%, "
            f"val {100 * row['val_acc']:.2f} ± {100 * row['val_ci']:.2f}%"
            + (f"; top failure classes: {top}" if top else "")
        )

    def set_lr(self, tasks_done: int) -> None:
        factor = self.m.lr_decay ** (tasks_done // max(self.m.lr_decay_every, 1))
        for group, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def hard_batch(self, batch: TaskBatch, acc: np.ndarray, loss: np.ndarray, hard_done: int) -> TaskBatch:
        """Hard tasks from learned tasks' failure classes, with fresh images: `ht.tasks_per_batch` per
        meta-batch in `batch` (the whole meta-batch, or the pool of `ht.pool_batches` of them: under
        torchrun every rank passes the gathered tables and builds the same hard tasks)."""
        ht, way = self.m.ht, self.m.way
        self.failures.update(int(c) for c in failure_classes(acc, loss, batch.classes))
        count = ht.tasks_per_batch * ht.pool_batches
        if ht.pool_batches == 1:
            chosen = [hard_task_classes(acc, loss, batch.classes, way)] * count
        else:  # the paper's pool: each hard task's classes drawn at random, a pure function of (seed, k)
            rngs = [np.random.default_rng([self.cfg.seed, HARD_SALT, hard_done + k]) for k in range(count)]
            chosen = pooled_task_classes(acc, loss, batch.classes, way, rngs)
        # Fresh images: none of a learned task's support or query images come back in its hard tasks.
        used = np.concatenate(
            [a.reshape(len(batch), way, -1) for a in (batch.support, batch.query)], axis=2
        )  # [T, way, shot + query], class-major like the labels
        seen: dict[int, set[int]] = {}
        for task_classes, images in zip(batch.classes, used, strict=True):
            for c, rows in zip(task_classes, images, strict=True):
                seen.setdefault(int(c), set()).update(int(i) for i in rows)
        episodes = [
            self.sampler.episode_for_classes(hard_done + k, classes, salt=HARD_SALT, exclude=seen)
            for k, classes in enumerate(chosen)
        ]
        return TaskBatch.of(episodes)

    def validate(self, store: ImageStore, sampler: EpisodeSampler, episodes: int) -> tuple[float, float]:
        feats = extract_features(self.learner.backbone, store, self.runtime, self.pre.mean, self.pre.std)
        init = self.learner.frozen_init(sampler.way)
        accs = evaluate_features(
            feats, sampler, episodes, "linear", loop=inner_loop(self.m, test=True), init=init
        )
        return confidence_interval(accs)


def initial_learner(cfg: Config, pretrained: Path) -> tuple[MetaLearner, Preprocess]:
    """The learner meta-training starts from: the phase-1 backbone (a run directory or its file) adapted
    for `meta.method`, and theta at zero; with the backbone's preprocessing."""
    source = pretrained / BACKBONE_FILE if pretrained.is_dir() else pretrained
    backbone, pre, _ = load_backbone(source)
    if pre.size != cfg.data.size:
        raise UserError(
            f"{source} was pre-trained at {pre.size}px but data.size is {cfg.data.size}; use the same size"
        )
    prepare_backbone(backbone, cfg.meta)
    return MetaLearner(backbone, cfg.meta.way), pre


@dataclass
class MetaValidator:
    """Fixed val episodes of the trained way and shot, scored after adapting theta as meta-test does;
    the best learner so far (the start included) is kept in `out/model.safetensors`."""

    trainer: MetaTrainer
    store: ImageStore
    out: Path
    best: float = -1.0

    def kept_note(self, tasks: int) -> str:
        """The last line of meta-training: which checkpoint was kept, and plainly so when it is the start."""
        seed = self.trainer.cfg.eval.selection_seed
        line = f"kept the model at task {tasks} (val {100 * self.best:.2f}% on selection episodes of seed {seed})"
        if tasks == 0:
            line += (
                "; meta-training never beat the start on val, so the kept model is"
                " the phase-1 features with the base learner"
            )
        return line

    def __post_init__(self) -> None:
        m, seed = self.trainer.m, self.trainer.cfg.eval.selection_seed
        self.sampler = EpisodeSampler(self.store, m.way, m.shot, m.query, seed)

    def __call__(self, row: dict[str, float | int]) -> dict[str, float | int]:
        """Validate now; returns `row` with val_acc, val_ci and val_s added."""
        t0 = time.perf_counter()
        tr = self.trainer
        val_acc, val_ci = tr.validate(self.store, self.sampler, tr.m.val_episodes)
        if val_acc > self.best:
            self.best = val_acc
            save_meta_model(self.out / MODEL_FILE, tr.learner, tr.cfg, tr.pre, tasks=str(tr.tasks_done))
        return {**row, "val_acc": val_acc, "val_ci": val_ci, "val_s": time.perf_counter() - t0}


def meta_train(
    cfg: Config, pretrained: Path, out: Path, *, overwrite: bool = False, resume: bool | None = None
) -> Path:
    """Run phase 2 from a phase-1 run directory (or backbone file) into `out`; returns the best model's path."""
    runtime = resolve_runtime(cfg)
    ctx = dist.context()
    m = cfg.meta
    if m.meta_batch < ctx.world_size:
        raise UserError(
            f"meta.meta_batch={m.meta_batch} is smaller than the {ctx.world_size} ranks; raise it"
        )
    learner, pre = initial_learner(cfg, pretrained)
    train = open_split(cfg.data, "train", progress=ctx.is_main)
    val = open_split(cfg.data, "val", progress=ctx.is_main)
    runtime.model(learner)
    trainer = MetaTrainer(cfg, learner, train, pre, runtime)
    with TrainingRun(out, cfg, "meta", overwrite=overwrite, resume=resume) as run:
        validate = MetaValidator(trainer, val, out)
        if run.state is not None:
            trainer.load_state_dict(run.state)
            validate.best = float(run.state["best"])
        if ctx.is_main:
            progress.note(trainer.describe())
        if run.state is None and ctx.is_main:
            row = validate({"step": 0, "tasks": 0, "hard_tasks": 0})
            run.log(row)
            progress.note(
                f"before meta-training: val {100 * row['val_acc']:.2f} ± {100 * row['val_ci']:.2f}%"
            )
        speed = Throughput()
        with progress.track(
            m.tasks, f"meta-train {m.shot}-shot", "task", initial=run.step, enabled=ctx.is_main
        ) as bar:
            while trainer.tasks_done < m.tasks:
                trainer.next_meta_batch()
                speed.add(m.meta_batch)
                bar.update(m.meta_batch, **trainer.recent(), tasks_s=speed.rate)
                if trainer.tasks_done % m.val_every < m.meta_batch or trainer.tasks_done >= m.tasks:
                    row = trainer.progress_row(speed.rate)
                    if ctx.is_main:
                        row = validate(row)
                        run.checkpoint(row, {**trainer.state_dict(), "best": validate.best})
                        progress.note(trainer.progress_line(row))
                        if m.ht.enabled:
                            _write_failures(out / FAILURES_FILE, trainer.failures, train.classes)
                    dist.barrier()
        kept = kept_tasks(out) if ctx.is_main else -1  # only rank 0 writes the model file
        if ctx.is_main:
            save_meta_model(out / LAST_FILE, learner, cfg, pre, tasks=str(trainer.tasks_done))
            if m.bn_recalibrate:
                recalibrate_bn(out, cfg, train)
            progress.note(validate.kept_note(kept))
        done = {"tasks": trainer.tasks_done, "hard_tasks": trainer.hard_done, "seconds": speed.elapsed}
        run.finish({"best_val": validate.best, "kept_tasks": kept, **done})
    return out / MODEL_FILE


def precise_bn(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics in `model` to the plain (momentum-free) average of the
    batch statistics of `batches` forwarded through it ("precise BN"); returns the number of batches.

    Only BN runs in train mode: dropout stays off, as where the statistics are used. Nothing else changes.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bns = [bn for bn in bns if bn.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # torch's cumulative average: batch k weighs 1/k, so all weigh alike
        bn.train()
    count = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                count += 1
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("precise_bn needs at least one batch")
    return count


def recalibration_batches(
    cfg: Config, store: ImageStore, pre: Preprocess, runtime: Runtime
) -> Iterator[torch.Tensor]:
    """`meta.bn_recalibrate` batches of train-split images, without augmentation, for `precise_bn`: batch j
    holds the support and query images of meta-training's meta-batch j (episodes of the run's own
    stream), so its class mix is the one BN normalised over in meta-training, and the pass is a pure
    function of the config."""
    m = cfg.meta
    sampler = EpisodeSampler(store, m.way, m.shot, m.query, cfg.seed)
    for j in range(m.bn_recalibrate):
        episodes = [sampler.episode(j * m.meta_batch + k) for k in range(m.meta_batch)]
        yield store_images(store, np.concatenate([np.r_[e.support, e.query] for e in episodes]), pre, runtime)


def recalibrate_bn(run_dir: Path, cfg: Config, train: ImageStore) -> None:
    """Re-estimate the BN statistics of a meta-train run's model files (the kept one and the last) with
    their own Phi on `recalibration_batches`, and save them in place, their metadata's `meta` now saying
    `bn_recalibrate`: what meta-test, export and predict then use."""
    runtime = resolve_runtime(cfg)
    for name in (MODEL_FILE, LAST_FILE):
        f = read_model_file(run_dir / name)
        runtime.model(f.module)
        assert isinstance(f.module, MetaLearner)
        with runtime.autocast():  # the precision meta-training ran in
            precise_bn(f.module.backbone, recalibration_batches(cfg, train, f.pre, runtime))
        save_weights(
            run_dir / name, f.module.state_dict(), {**f.info, **model_metadata(cfg, f.pre, cfg.meta, {})}
        )
    progress.note(
        f"re-estimated the BN statistics of {MODEL_FILE} and {LAST_FILE} on {cfg.meta.bn_recalibrate} "
        "batches of train-split images"
    )


def recalibrate_run(
    source: Path, out: Path, batches: int, *, data_root: str | None = None, overwrite: bool = False
) -> Path:
    """A copy of the finished meta-train run `source` in `out` with its BN statistics re-estimated on
    `batches` batches: what `meta_train` with `meta.bn_recalibrate: batches` writes, without meta-training
    again (the pass comes after it and changes nothing before). `mtl compare out source` then pairs the
    two on the same episodes. Returns out's model file."""
    if not (source / DONE_FILE).exists() or not (source / MODEL_FILE).exists():
        raise UserError(f"{source} holds no finished meta-train run; pass the folder mtl meta-train wrote")
    if batches < 1:
        raise UserError(f"--batches must be at least 1, got {batches}")
    cfg = load_config(source / CONFIG_FILE, [f"meta.bn_recalibrate={batches}"])
    cfg = with_data_root(cfg, data_root) if data_root else cfg
    train = open_split(cfg.data, "train")
    with RunDir.open(out, cfg, "meta", overwrite=overwrite) as run:
        for name in (MODEL_FILE, LAST_FILE, METRICS_FILE, FAILURES_FILE):
            if (source / name).exists():
                atomic_write_bytes(out / name, (source / name).read_bytes())
        recalibrate_bn(out, cfg, train)
        summary = {**read_json(source / SUMMARY_FILE), "recalibrated_from": str(source)}
        write_json(out / SUMMARY_FILE, summary)
        run.finish(summary)
    return out / MODEL_FILE


def kept_tasks(run_dir: Path) -> int:
    """Tasks learned when a meta-train run's kept model was saved (0 = the start), as its model file
    records it; -1 if the file does not say."""
    return int(safetensors_metadata(run_dir / MODEL_FILE).get("tasks", -1))


def _write_failures(path: Path, counts: Counter[int], names: list[str]) -> None:
    lines = ["class,name,count"] + [f"{c},{names[c]},{n}" for c, n in counts.most_common()]
    atomic_write_text(path, "\n".join(lines) + "\n")

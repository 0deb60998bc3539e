"""Phase 2: meta-transfer learning of the SS parameters Phi and the base learner's initialisation theta.

For each task the base learner starts from theta and takes `inner_steps` gradient steps on the
support features (inner loop); the query loss after them updates Phi (lr gamma_1) and theta
(lr gamma_2) with Adam (outer loop). The tasks of a meta-batch go through the backbone as one batch
and their inner loops run batched. With `meta.ht.enabled`, each meta-batch is followed by hard
tasks built from its failure classes (see `hard_tasks`).

Every random choice of step k (episodes, augmentation) is derived from (seed, k), so a run resumed
from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from metatransfer import distributed as dist
from metatransfer.config import Config
from metatransfer.data.augment import to_float
from metatransfer.data.preprocess import Preprocess
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
from metatransfer.models.model_files import BACKBONE_FILE, MODEL_FILE, load_backbone, save_meta_model
from metatransfer.models.scale_shift import describe_trainable
from metatransfer.runs import (
    MetricsLog,
    RunDir,
    atomic_write_text,
    load_state,
    save_state,
    write_json,
)
from metatransfer.train.evaluate import (
    confidence_interval,
    episode_labels,
    evaluate_features,
    extract_features,
)
from metatransfer.train.hard_tasks import failure_classes, hard_task_classes
from metatransfer.train.loop import Throughput, check_finite, make_augment

LAST_FILE = "last.safetensors"  # the end of meta-training
STATE_FILE = "state.pt"
HARD_SALT = 1  # hard tasks draw from their own episode stream, so HT leaves ordinary tasks unchanged


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


class MetaTrainer:
    """One meta-training run's moving parts; `step` learns one meta-batch (plus its hard tasks)."""

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
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.sampler = EpisodeSampler(train, m.way, m.shot, m.query, cfg.seed)
        self.loop = inner_loop(m)
        self.augment = make_augment(cfg, pre, runtime.device) if m.augment else None
        # Only the query forward (the one with a backward) is compiled: it holds nearly all the time,
        # and the small no-grad support forward would cost a compile of its own.
        self._query_forward = runtime.compiled(learner.backbone)
        self.failures: Counter[int] = Counter()

    def _images(self, rows: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        flat = rows.reshape(-1)
        x = to_float(
            torch.from_numpy(np.ascontiguousarray(self.train.images[flat])), self.pre.mean, self.pre.std
        )
        x = self.runtime.images(x)
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
            self.opt.step()
            return float("nan"), np.zeros((0, self.m.way)), np.zeros((0, self.m.way))
        gen = torch.Generator(device=self.runtime.device).manual_seed(step_seed)
        self.learner.backbone.eval()  # BN keeps phase-1 statistics; its affine may still be meta-learned
        xs, xq = self._images(batch.support, gen), self._images(batch.query, gen)
        device = self.runtime.device
        ys, yq = (
            episode_labels(self.m.way, self.m.shot, t, device),
            episode_labels(self.m.way, self.m.query, t, device),
        )
        w0 = self.learner.theta_weight.expand(t, -1, -1)
        b0 = self.learner.theta_bias.expand(t, -1)
        if self.m.first_order:
            with torch.no_grad():  # the support branch needs no graph in the first-order mode
                fs = self._features(self.learner.backbone, xs, t)
            w, b = adapt_first_order(prepare(fs, self.loop), ys, w0, b0, self.loop)
        else:
            fs = self._features(self.learner.backbone, xs, t)
            w, b = adapt(prepare(fs, self.loop), ys, w0, b0, self.loop)
        fq = self._features(self._query_forward, xq, t)
        scores = logits(prepare(fq, self.loop), w, b, self.loop)
        loss = F.cross_entropy(scores.reshape(-1, self.m.way), yq.reshape(-1))
        check_finite(loss, where)
        # Each rank weighs its mean by its share of the tasks, so the all-reduced sum is the mean over all.
        (loss * (t / total)).backward()
        dist.all_reduce_grads(params)
        self.opt.step()
        with torch.no_grad():
            acc = per_class_accuracy(scores, yq, self.m.way).cpu().numpy()
            cls_loss = per_class_loss(scores, yq, self.m.way).cpu().numpy()
        return float(loss.detach()), acc, cls_loss

    def set_lr(self, tasks_done: int) -> None:
        factor = self.m.lr_decay ** (tasks_done // max(self.m.lr_decay_every, 1))
        for group, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def hard_batch(self, batch: TaskBatch, acc: np.ndarray, loss: np.ndarray, hard_done: int) -> TaskBatch:
        """Hard tasks from a learned meta-batch's failure classes, with fresh images (the whole meta-batch:
        under torchrun every rank passes the gathered tables and builds the same hard tasks)."""
        self.failures.update(int(c) for c in failure_classes(acc, loss, batch.classes))
        classes = hard_task_classes(acc, loss, batch.classes, self.m.way)
        seen: dict[int, set[int]] = {}
        for task_classes, query in zip(
            batch.classes, batch.query.reshape(len(batch), self.m.way, -1), strict=True
        ):
            for c, q in zip(task_classes, query, strict=True):
                seen.setdefault(int(c), set()).update(int(i) for i in q)
        episodes = [
            self.sampler.episode_for_classes(hard_done + k, classes, salt=HARD_SALT, exclude=seen)
            for k in range(self.m.ht.tasks_per_batch)
        ]
        return TaskBatch.of(episodes)

    def validate(self, store: ImageStore, sampler: EpisodeSampler, episodes: int) -> tuple[float, float]:
        feats = extract_features(self.learner.backbone, store, self.runtime, self.pre.mean, self.pre.std)
        init = self.learner.frozen_init(sampler.way)
        accs = evaluate_features(
            feats, sampler, episodes, "linear", loop=inner_loop(self.m, test=True), init=init
        )
        return confidence_interval(accs)


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
    source = pretrained / BACKBONE_FILE if pretrained.is_dir() else pretrained
    backbone, pre, _ = load_backbone(source)
    if pre.size != cfg.data.size:
        raise UserError(
            f"{source} was pre-trained at {pre.size}px but data.size is {cfg.data.size}; use the same size"
        )
    train = open_split(cfg.data, "train", progress=ctx.is_main)
    val = open_split(cfg.data, "val", progress=ctx.is_main)
    prepare_backbone(backbone, m)
    learner = MetaLearner(backbone, m.way)
    runtime.model(learner)
    trainer = MetaTrainer(cfg, learner, train, pre, runtime)
    val_sampler = EpisodeSampler(val, m.way, m.shot, m.query, cfg.eval.selection_seed)
    run = RunDir.open(out, cfg, overwrite=overwrite, resume=resume) if ctx.is_main else None
    tasks_done = hard_done = 0
    best = -1.0
    resuming = dist.broadcast_flag(run.resuming if run else False)
    if resuming:
        state = load_state(out / STATE_FILE)
        learner.load_state_dict(state["model"])
        trainer.opt.load_state_dict(state["optimizer"])
        tasks_done, hard_done, best = int(state["tasks"]), int(state["hard"]), float(state["best"])
        trainer.failures = Counter({int(k): int(v) for k, v in state["failures"].items()})
    log = MetricsLog(out / "metrics.csv", resume=resuming, keep_until=tasks_done) if run else None
    if ctx.is_main:
        print(
            f"meta-training '{m.method}' {m.way}-way {m.shot}-shot, {m.tasks} tasks in meta-batches of {m.meta_batch}"
            f"{' + hard tasks' if m.ht.enabled else ''}; {describe_trainable(learner)}"
        )
    if tasks_done == 0 and ctx.is_main and not resuming:
        val_acc, val_ci = trainer.validate(val, val_sampler, m.val_episodes)
        assert log is not None
        log.append({"step": 0, "tasks": 0, "hard_tasks": 0, "val_acc": val_acc, "val_ci": val_ci})
        tqdm.write(f"before meta-training: val {100 * val_acc:.2f} ± {100 * val_ci:.2f}%")
        # The starting point competes too: the kept model is never worse on val than no meta-training.
        best = val_acc
        save_meta_model(out / MODEL_FILE, learner, cfg, pre, tasks="0")
    speed = Throughput()
    bar = tqdm(total=m.tasks, initial=tasks_done, desc="meta-train", unit="task", disable=not ctx.is_main)
    try:
        losses: list[float] = []
        accs: list[float] = []
        while tasks_done < m.tasks:
            step = tasks_done // m.meta_batch
            trainer.set_lr(tasks_done)
            mine = dist.rank_share(list(range(tasks_done, tasks_done + m.meta_batch)))
            batch = TaskBatch.of([trainer.sampler.episode(i) for i in mine])
            loss, acc, cls_loss = trainer.learn(
                batch,
                step_seed=cfg.seed * 1_000_003 + 2 * step,
                total=m.meta_batch,
                where=f"meta-training task {tasks_done + 1}",
            )
            losses.append(loss)
            accs.append(float(acc.mean()))
            tasks_done += m.meta_batch
            if m.ht.enabled and tasks_done > m.ht.start_after:
                whole = TaskBatch(*(dist.gather_rows(a) for a in (batch.classes, batch.support, batch.query)))
                hard = trainer.hard_batch(whole, dist.gather_rows(acc), dist.gather_rows(cls_loss), hard_done)
                share = TaskBatch(*(dist.rank_share(a) for a in (hard.classes, hard.support, hard.query)))
                trainer.learn(
                    share,
                    step_seed=cfg.seed * 1_000_003 + 2 * step + 1,
                    total=len(hard),
                    where=f"hard task {hard_done + 1}",
                )
                hard_done += len(hard)
            speed.add(m.meta_batch)
            bar.update(m.meta_batch)
            bar.set_postfix(
                loss=f"{np.mean(losses[-50:]):.3f}",
                acc=f"{np.mean(accs[-50:]):.3f}",
                tasks_s=f"{speed.rate:.2f}",
            )
            if tasks_done % m.val_every < m.meta_batch or tasks_done >= m.tasks:
                if ctx.is_main:
                    t0 = time.perf_counter()
                    val_acc, val_ci = trainer.validate(val, val_sampler, m.val_episodes)
                    if val_acc > best:
                        best = val_acc
                        save_meta_model(out / MODEL_FILE, learner, cfg, pre, tasks=str(tasks_done))
                    assert log is not None
                    log.append(
                        {
                            "step": tasks_done,
                            "tasks": tasks_done,
                            "hard_tasks": hard_done,
                            "train_loss": float(np.mean(losses)),
                            "train_query_acc": float(np.mean(accs)),
                            "val_acc": val_acc,
                            "val_ci": val_ci,
                            "tasks_per_s": speed.rate,
                            "val_s": time.perf_counter() - t0,
                        }
                    )
                    save_state(
                        out / STATE_FILE,
                        {
                            "model": learner.state_dict(),
                            "optimizer": trainer.opt.state_dict(),
                            "tasks": tasks_done,
                            "hard": hard_done,
                            "best": best,
                            "failures": {str(k): v for k, v in trainer.failures.items()},
                        },
                    )
                    top = ", ".join(f"{train.classes[c]}x{n}" for c, n in trainer.failures.most_common(10))
                    tqdm.write(
                        f"tasks {tasks_done} (+{hard_done} hard): query acc {100 * np.mean(accs):.1f}%, "
                        f"val {100 * val_acc:.2f} ± {100 * val_ci:.2f}%"
                        + (f"; top failure classes: {top}" if top else "")
                    )
                    if m.ht.enabled:
                        _write_failures(out / "failure_classes.csv", trainer.failures, train.classes)
                losses.clear()
                accs.clear()
                dist.barrier()
    finally:
        bar.close()
    if run is not None:
        save_meta_model(out / LAST_FILE, learner, cfg, pre, tasks=str(tasks_done))
        summary = {"best_val": best, "tasks": tasks_done, "hard_tasks": hard_done, "seconds": speed.elapsed}
        write_json(out / "summary.json", summary)
        run.finish(summary)
        run.close()
    return out / MODEL_FILE


def _write_failures(path: Path, counts: Counter[int], names: list[str]) -> None:
    lines = ["class,name,count"] + [f"{c},{names[c]},{n}" for c, n in counts.most_common()]
    atomic_write_text(path, "\n".join(lines) + "\n")

"""Phase 1: large-scale supervised pre-training of the backbone Theta on all train-split classes.

Each epoch ends with a few-shot validation on fixed val episodes (nearest class mean over frozen
features) and the best epoch's backbone is kept as `backbone.safetensors`. Every random stream of an
epoch is derived from (seed, epoch), so a run resumed from its last epoch checkpoint continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer import distributed as dist
from metatransfer import progress
from metatransfer.config import Config
from metatransfer.data.augment import to_float
from metatransfer.data.preprocess import Preprocess, preprocess_for
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import ImageStore, open_split
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.models.model_files import BACKBONE_FILE, build_backbone, save_backbone
from metatransfer.train.evaluate import confidence_interval, evaluate_features, extract_features
from metatransfer.train.loop import (
    ScaledOptimizer,
    Throughput,
    TrainingRun,
    batches,
    check_finite,
    make_augment,
    seed_everything,
)


class Classifier(nn.Module):
    """Backbone Theta plus the head used only in phase 1 (discarded afterwards).

    head "linear" is the paper's; "cosine" scores normalised features against normalised class
    weights with a learned scale (Chen et al. 2019, Baseline++), which clusters the features of a
    class more tightly and so suits the cosine base learner and nearest-mean evaluation.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear") -> None:
        super().__init__()
        self.backbone = backbone
        self.cosine = head == "cosine"
        self.head = nn.Linear(int(backbone.out_dim), num_classes, bias=not self.cosine)  # type: ignore[arg-type]
        self.scale = nn.Parameter(torch.tensor(10.0)) if self.cosine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        if self.scale is None:
            return self.head(f)
        return self.scale * F.linear(
            F.normalize(f.float(), dim=-1), F.normalize(self.head.weight.float(), dim=-1)
        )


def lr_at(cfg: Config, progress: float) -> float:
    """Learning rate after `progress` epochs (fractional), with linear warm-up then cosine or step decay."""
    p = cfg.pretrain
    if progress < p.warmup_epochs:
        return p.lr * (progress + 1e-3) / p.warmup_epochs
    if p.schedule == "cosine":
        span = max(p.epochs - p.warmup_epochs, 1e-9)
        return 0.5 * p.lr * (1 + math.cos(math.pi * min((progress - p.warmup_epochs) / span, 1.0)))
    return p.lr * p.gamma ** int(progress // p.step_size)


@dataclass
class FewShotValidator:
    """Fixed 5-way val episodes scored by nearest class mean over frozen features (per shot)."""

    store: ImageStore
    pre: Preprocess
    shots: list[int]
    episodes: int
    seed: int
    query: int = 15
    way: int = 5

    def __call__(self, backbone: nn.Module, runtime: Runtime) -> dict[str, float]:
        feats = extract_features(backbone, self.store, runtime, self.pre.mean, self.pre.std)
        out: dict[str, float] = {}
        for shot in self.shots:
            sampler = EpisodeSampler(self.store, self.way, shot, self.query, self.seed)
            mean, ci = confidence_interval(evaluate_features(feats, sampler, self.episodes, "ncm"))
            out[f"val_{shot}shot"] = mean
            out[f"val_{shot}shot_ci"] = ci
        return out


class Pretrainer:
    """One pre-training run's moving parts; `step` learns one batch of images, as `MetaTrainer.learn`
    learns one meta-batch. Built from a config, the train split and a runtime (the preprocessing follows
    the config unless given)."""

    def __init__(
        self, cfg: Config, train: ImageStore, runtime: Runtime, pre: Preprocess | None = None
    ) -> None:
        p = cfg.pretrain
        self.cfg, self.p, self.train, self.runtime = cfg, p, train, runtime
        self.pre = pre or preprocess_for(cfg, train.images.shape[-1])
        seed_everything(cfg.seed)
        self.model = Classifier(build_backbone(cfg, self.pre.channels), train.num_classes, p.head)
        runtime.model(self.model)
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=p.lr,
            momentum=p.momentum,
            nesterov=p.nesterov,
            weight_decay=p.weight_decay,
        )
        self.update = ScaledOptimizer(self.opt, runtime)
        self.augment = make_augment(cfg, self.pre, runtime.device) if p.augment.enabled else None
        self.forward = dist.wrap_data_parallel(self.model, runtime.device)  # DDP under torchrun
        self.global_batch = p.batch_size * dist.context().world_size
        self.steps_per_epoch = max((p.images_per_epoch or len(train)) // self.global_batch, 1)

    def step(
        self, idx: torch.Tensor, lr: float, gen: torch.Generator | None = None, where: str = "pre-training"
    ) -> tuple[float, int]:
        """One SGD step at learning rate `lr` on the images `idx` [B] (this rank's share of a global
        batch); `gen` draws the augmentation. Returns (mean loss, correct predictions)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        rows = np.sort(idx.numpy())  # sorted reads are kinder to a memory-mapped store
        x = to_float(
            torch.from_numpy(np.ascontiguousarray(self.train.images[rows])), self.pre.mean, self.pre.std
        )
        y = torch.from_numpy(self.train.labels[rows]).to(self.runtime.device)
        x = self.runtime.images(x)
        if self.augment is not None:
            x = self.augment(x, generator=gen)
        with self.runtime.autocast():
            scores = self.forward(x)
            loss = F.cross_entropy(scores.float(), y, label_smoothing=self.p.label_smoothing)
        check_finite(loss, where)
        self.opt.zero_grad(set_to_none=True)
        self.update.backward(loss)
        self.update.step()
        return float(loss.detach()), int((scores.argmax(1) == y).sum())

    def epoch(self, epoch: int) -> dict[str, float | int]:
        """Train epoch `epoch` (0-based); every random stream is derived from (seed, epoch) so an epoch
        is the same whether or not the run was resumed before it. Returns its metrics row."""
        seed = self.cfg.seed * 100_003 + epoch
        seed_everything(seed)
        gen = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator(device=self.runtime.device).manual_seed(seed + 7)
        self.model.train()
        speed = Throughput()
        loss_sum = correct = seen = 0.0
        n = self.steps_per_epoch
        bar = progress.track(
            n, f"pretrain epoch {epoch + 1}/{self.p.epochs}", "step", enabled=dist.context().is_main
        )
        with bar:
            index_stream = batches(len(self.train), self.global_batch, gen)
            for step in range(n):
                idx = next(index_stream, None)
                if idx is None:  # images_per_epoch larger than the split: a new pass
                    index_stream = batches(len(self.train), self.global_batch, gen)
                    idx = next(index_stream)
                idx = dist.rank_share(idx)
                lr = lr_at(self.cfg, epoch + step / n)
                loss, hits = self.step(idx, lr, aug_gen, where=f"epoch {epoch + 1} step {step + 1}")
                loss_sum, correct, seen = loss_sum + loss * len(idx), correct + hits, seen + len(idx)
                speed.add(len(idx) * dist.context().world_size)
                bar.update(1, loss=loss_sum / seen, acc=correct / seen, img_s=round(speed.rate))
        row: dict[str, float | int] = {
            "epoch": epoch + 1,
            "step": epoch + 1,
            "lr": lr_at(self.cfg, epoch + 1),
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "images_per_s": speed.rate,
            "epoch_s": speed.elapsed,
        }
        if self.update.scaler.is_enabled():
            row["skipped_steps"] = self.update.take_skipped()  # fp16 steps with inf/NaN gradients
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), **self.update.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.update.load_state_dict(state)

    def describe(self) -> str:
        n_params = sum(t.numel() for t in self.model.backbone.parameters())
        return (
            f"pre-training {self.cfg.model.backbone} ({n_params:,} parameters) on {self.train.num_classes} classes, "
            f"{len(self.train)} images at {self.pre.size}px; {self.p.epochs} epochs x {self.steps_per_epoch} steps, "
            f"{self.runtime.device.type} {self.runtime.precision}"
        )


def pretrain(cfg: Config, out: Path, *, overwrite: bool = False, resume: bool | None = None) -> Path:
    """Run phase 1 into the run directory `out`; returns the path of the best backbone's safetensors."""
    runtime = resolve_runtime(cfg)
    ctx = dist.context()
    p = cfg.pretrain
    train = open_split(cfg.data, "train", progress=ctx.is_main)
    val = open_split(cfg.data, "val", progress=ctx.is_main)
    trainer = Pretrainer(cfg, train, runtime)
    validate = FewShotValidator(
        val, trainer.pre, p.val_shots, p.val_episodes, cfg.eval.selection_seed, cfg.eval.query
    )
    with TrainingRun(out, cfg, "pretrain", overwrite=overwrite, resume=resume) as run:
        best = -1.0
        if run.state is not None:
            trainer.load_state_dict(run.state)
            best = float(run.state["best"])
        if ctx.is_main:
            progress.note(trainer.describe())
        for epoch in range(run.step, p.epochs):
            row = trainer.epoch(epoch)
            if ctx.is_main:
                t0 = time.perf_counter()
                row.update(validate(trainer.model.backbone, runtime))
                row["val_s"] = time.perf_counter() - t0
                score = float(np.mean([row[f"val_{s}shot"] for s in p.val_shots]))
                if score > best:
                    best = score
                    save_backbone(
                        out / BACKBONE_FILE, trainer.model.backbone, cfg, trainer.pre, epoch=str(epoch + 1)
                    )
                run.checkpoint(row, {**trainer.state_dict(), "epoch": epoch, "best": best})
                progress.note(_epoch_line(row, p.val_shots, p.epochs))
            dist.barrier()
        run.finish({"best_val": best, "epochs": p.epochs, "backbone": str(out / BACKBONE_FILE)})
    return out / BACKBONE_FILE


def _epoch_line(row: dict[str, float | int], shots: list[int], epochs: int) -> str:
    accs = "  ".join(f"{s}-shot {100 * row[f'val_{s}shot']:.2f}%" for s in shots)
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f}, train acc {100 * row['train_acc']:.1f}%, "
        f"val 5-way {accs} (nearest mean), {row['images_per_s']:.0f} img/s"
    )

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer import distributed as dist
from metatransfer import progress
from metatransfer.config import Config
from metatransfer.data.augment import to_float
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import ImageStore, open_split
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.monitor import RunLog
from metatransfer.runs import (
    RunDir,
    load_state,
    save_state,
    write_json,
)
from metatransfer.train.common import (
    BACKBONE_FILE,
    Preprocess,
    Throughput,
    batches,
    build_backbone,
    check_finite,
    make_augment,
    preprocess_for,
    save_backbone,
    seed_everything,
)
from metatransfer.train.evaluate import confidence_interval, evaluate_features, extract_features

STATE_FILE = "state.pt"


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


def pretrain(cfg: Config, out: Path, *, overwrite: bool = False, resume: bool | None = None) -> Path:
    """Run phase 1 into the run directory `out`; returns the path of the best backbone's safetensors."""
    runtime = resolve_runtime(cfg)
    ctx = dist.context()
    train = open_split(cfg.data, "train", progress=ctx.is_main)
    val = open_split(cfg.data, "val", progress=ctx.is_main)
    pre = preprocess_for(cfg, train.images.shape[-1])
    seed_everything(cfg.seed)
    model = Classifier(build_backbone(cfg, pre.channels), train.num_classes, cfg.pretrain.head)
    runtime.model(model)
    p = cfg.pretrain
    opt = torch.optim.SGD(
        model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay
    )
    augment = make_augment(cfg, pre, runtime.device)
    validate = FewShotValidator(
        val, pre, p.val_shots, p.val_episodes, cfg.eval.selection_seed, cfg.eval.query
    )
    run = RunDir.open(out, cfg, overwrite=overwrite, resume=resume, lock=ctx.is_main) if ctx.is_main else None
    start_epoch, best = 0, -1.0
    resuming = dist.broadcast_flag(run.resuming if run else False)
    if resuming:
        state = load_state(out / STATE_FILE)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
    trainer = dist.wrap_data_parallel(model, runtime.device)
    log = (
        RunLog(out, resume=resuming, keep_until=start_epoch, tensorboard=cfg.logging.tensorboard)
        if run
        else None
    )
    per_epoch = p.images_per_epoch or len(train)
    steps_per_epoch = max(per_epoch // (p.batch_size * ctx.world_size), 1)
    if ctx.is_main:
        n_params = sum(t.numel() for t in model.backbone.parameters())
        progress.note(
            f"pre-training {cfg.model.backbone} ({n_params:,} parameters) on {train.num_classes} classes, "
            f"{len(train)} images at {pre.size}px; {p.epochs} epochs x {steps_per_epoch} steps, "
            f"{runtime.device.type} {runtime.precision}"
        )
    for epoch in range(start_epoch, p.epochs):
        seed_everything(cfg.seed * 100_003 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        aug_gen = torch.Generator(device=runtime.device).manual_seed(cfg.seed * 100_003 + epoch + 7)
        model.train()
        speed = Throughput()
        loss_sum = correct = seen = 0.0
        bar = progress.track(
            steps_per_epoch, f"pretrain epoch {epoch + 1}/{p.epochs}", "step", enabled=ctx.is_main
        )
        try:
            index_stream = batches(len(train), p.batch_size * ctx.world_size, gen)
            for step in range(steps_per_epoch):
                try:
                    idx = next(index_stream)
                except StopIteration:
                    index_stream = batches(len(train), p.batch_size * ctx.world_size, gen)
                    idx = next(index_stream)
                idx = dist.rank_share(idx)
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, epoch + step / steps_per_epoch)
                rows = np.sort(idx.numpy())  # sorted reads are kinder to a memory-mapped store
                x = to_float(torch.from_numpy(np.ascontiguousarray(train.images[rows])), pre.mean, pre.std)
                y = torch.from_numpy(train.labels[rows]).to(runtime.device)
                x = runtime.images(x)
                if p.augment.enabled:
                    x = augment(x, generator=aug_gen)
                with runtime.autocast():
                    scores = trainer(x)
                    loss = F.cross_entropy(scores.float(), y, label_smoothing=p.label_smoothing)
                check_finite(loss, f"epoch {epoch + 1} step {step + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += float((scores.argmax(1) == y).sum())
                seen += len(y)
                speed.add(len(y) * ctx.world_size)
                bar.update(1, loss=loss_sum / seen, acc=correct / seen, img_s=round(speed.rate))
        finally:
            bar.close()
        train_time = speed.elapsed
        row: dict[str, float | int] = {
            "epoch": epoch + 1,
            "step": epoch + 1,
            "lr": lr_at(cfg, epoch + 1),
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "images_per_s": speed.rate,
            "epoch_s": train_time,
        }
        if ctx.is_main:
            t0 = time.perf_counter()
            row.update(validate(model.backbone, runtime))
            row["val_s"] = time.perf_counter() - t0
            score = float(np.mean([row[f"val_{s}shot"] for s in p.val_shots]))
            if score > best:
                best = score
                save_backbone(out / BACKBONE_FILE, model.backbone, cfg, pre, epoch=str(epoch + 1))
            # The row goes first: a crash before the state is saved re-runs the epoch and rewrites the row.
            assert log is not None
            log.append(row)
            # One file holds everything a resume needs, so a crash cannot leave two out of step.
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best}
            save_state(out / STATE_FILE, state)
            shots = "  ".join(f"{s}-shot {100 * row[f'val_{s}shot']:.2f}%" for s in p.val_shots)
            progress.note(
                f"epoch {epoch + 1}/{p.epochs}: loss {row['train_loss']:.3f}, train acc {100 * row['train_acc']:.1f}%, "
                f"val 5-way {shots} (nearest mean), {speed.rate:.0f} img/s"
            )
        dist.barrier()
    if run is not None:
        summary = {"best_val": best, "epochs": p.epochs, "backbone": str(out / BACKBONE_FILE)}
        write_json(out / "summary.json", summary)
        run.finish(summary)
        run.close()
    if log is not None:
        log.close()
    return out / BACKBONE_FILE

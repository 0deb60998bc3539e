"""What the training loops of phases 1 and 2 share: the run's lifecycle, fp16 loss scaling, seeding,
the finite-loss check, throughput, shuffled index batches and the batched augmentation."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from metatransfer import distributed as dist
from metatransfer import progress
from metatransfer.config import Config, Phase
from metatransfer.data.augment import BatchAugment
from metatransfer.data.preprocess import Preprocess
from metatransfer.device import Runtime
from metatransfer.errors import TrainingError
from metatransfer.monitor import RunLog
from metatransfer.runs import RunDir, is_finished, load_state, save_state, write_json

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"


_PHASE_NAMES = {"pretrain": "pre-training", "meta": "meta-training"}


def reuse_finished(out: Path, cfg: Config, phase: Phase, *, overwrite: bool = False) -> bool:
    """Whether a command that chains phases (`mtl run`, `ablate`, `compare-ht`) may reuse `out` instead of
    training it again: it holds a finished `phase` run of `cfg`'s settings for that phase (`phase_inputs`)
    and `overwrite` was not asked for. Says so when it reuses."""
    if overwrite or not is_finished(out, cfg, phase):
        return False
    if dist.context().is_main:
        progress.note(
            f"{_PHASE_NAMES[phase]}: reusing the finished run in {out} (same settings for this phase)"
        )
    return True


class TrainingRun:
    """One phase's run directory from open to finish: `with TrainingRun(out, cfg, phase) as run: ...`.

    Entering opens and locks `out` and, when it holds an unfinished run of the same config, reads the
    checkpoint to resume from (`state`, `step`). `log` appends a metrics row, `checkpoint` appends one
    and saves the resume state, `finish` writes the summary and marks the run done. Leaving the block
    by any exception releases the lock and keeps the last checkpoint, so the same command resumes.

    Under torchrun only rank 0 opens, locks and writes; every rank reads the same `state`.
    """

    def __init__(
        self, out: Path, cfg: Config, phase: Phase, *, overwrite: bool = False, resume: bool | None = None
    ) -> None:
        self.out, self.cfg, self.phase, self.overwrite, self.resume = out, cfg, phase, overwrite, resume
        self.is_main = dist.context().is_main
        self.state: dict[str, Any] | None = None  # the checkpoint resumed from; None on a fresh start
        self._dir: RunDir | None = None
        self._log: RunLog | None = None  # metrics.csv, curves.png and TensorBoard scalars

    @property
    def step(self) -> int:
        """The progress counter (epochs, tasks) of the checkpoint resumed from; 0 on a fresh start."""
        return int(self.state["step"]) if self.state is not None else 0

    def __enter__(self) -> TrainingRun:
        if self.is_main:
            self._dir = RunDir.open(
                self.out, self.cfg, self.phase, overwrite=self.overwrite, resume=self.resume
            )
        try:
            if dist.broadcast_flag(self._dir.resuming if self._dir else False):
                self.state = load_state(self.out / STATE_FILE)
            if self.is_main:
                # Rows logged after the checkpoint are produced again, so they are dropped.
                self._log = RunLog(
                    self.out,
                    resume=self.state is not None,
                    keep_until=self.step,
                    tensorboard=self.cfg.logging.tensorboard,
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log(self, row: Mapping[str, Any]) -> None:
        """Append a metrics row (rank 0; a no-op elsewhere)."""
        if self._log is not None:
            self._log.append(row)

    def checkpoint(self, row: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        """Log `row`, then save `state` to resume after `row["step"]` (rank 0).

        The row goes first: a crash before the state is saved re-runs the step and rewrites the row.
        One file holds everything a resume needs, so a crash cannot leave two out of step.
        """
        if self._log is not None:
            self._log.append(row)
            save_state(self.out / STATE_FILE, {**state, "step": int(row["step"])})

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json, mark the run finished and drop its resume state (rank 0)."""
        if self._dir is not None:
            write_json(self.out / SUMMARY_FILE, dict(summary))
            self._dir.finish(summary)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None


class ScaledOptimizer:
    """`optimizer`'s step behind a GradScaler: loss scaling for fp16, a pass-through otherwise.

    fp16 gradients of small losses underflow to zero, so the loss is multiplied by a scale before the
    backward pass and the gradients are divided by it (unscaled) before the step. A step whose
    gradients hold inf or NaN is skipped and the scale halved; it doubles after 2000 clean steps.
    The scale is part of the resume state, so a resumed run skips the same steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, runtime: Runtime) -> None:
        self.optimizer = optimizer
        self.scaler = runtime.grad_scaler()
        self.skipped = 0  # steps skipped for inf/NaN gradients since the last `take_skipped`

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Unscale the gradients and step, unless they hold inf/NaN; then adjust the scale."""
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < before)

    def take_skipped(self) -> int:
        """Steps skipped since the last call (for a metrics row)."""
        n, self.skipped = self.skipped, 0
        return n

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (dropout and init use them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_finite(loss: torch.Tensor, where: str) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss became {value} at {where}; the last good checkpoint is kept. Lower the learning rate or use precision=fp32"
        )


class Throughput:
    """Items per second over the whole run so far (for progress bars and metrics)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / max(self.elapsed, 1e-9)


def batches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Shuffled index batches over range(n) drawn from `generator` (so an epoch is reproducible alone)."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def make_augment(cfg: Config, pre: Preprocess, device: torch.device) -> BatchAugment:
    """The batched augmentation of `pretrain.augment` (meta-training reuses it when `meta.augment`)."""
    a = cfg.pretrain.augment
    return BatchAugment(
        size=pre.size,
        channels=pre.channels,
        crop_scale=(a.crop_scale[0], a.crop_scale[1]),
        flip=a.flip,
        color_jitter=a.color_jitter,
        mean=pre.mean,
        std=pre.std,
    ).to(device)

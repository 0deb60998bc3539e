"""The GPU check's numerics: short runs of both phases' real steps in fp32, bf16 and fp16 (with its
loss scaler) from the same weights on the same batches, and how far their loss curves drift apart."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fixtures import PRETRAIN_CLASSES, QUERY, meta_config, project_learner, random_store
from gpu_sections import Check, Skip, part
from metatransfer.config import Precision
from metatransfer.train.loop import ScaledOptimizer
from metatransfer.train.meta import MetaTrainer, TaskBatch
from pretrain_bench import batch_rows, pretrainer

# Tolerances of a bf16 or fp16 curve against fp32's, as fractions of the fp32 loss:
FIRST_TOLERANCE = 0.01  # step 1: the same weights and batch, so only the forward's rounding differs
LOSS_TOLERANCE = 0.05  # mean loss of the second half of the steps (fp16 may skip a step or two at first)
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")


def scaler_state(update: ScaledOptimizer) -> dict[str, Any]:
    state: dict[str, Any] = {"scaler_enabled": update.scaler.is_enabled(), "skipped_steps": update.skipped}
    if update.scaler.is_enabled():
        state["final_scale"] = float(update.scaler.get_scale())
    return state


def pretrain_curve(check: Check, precision: Precision) -> tuple[list[float], dict[str, Any]]:
    """Losses of ``numerics_steps`` Pretrainer steps in ``precision``, from the same weights, batches and
    augmentation draws as every other precision; plus the loss scaler's state."""
    plan, net = check.plan, check.plan.net
    per_class = plan.numerics_batch * plan.numerics_steps // PRETRAIN_CLASSES + 1
    store = random_store(PRETRAIN_CLASSES, per_class, net.size, net.channels, "train", seed=3)
    trainer = pretrainer(net, plan.numerics_batch, check.target, store, precision=precision)
    gen = torch.Generator(device=trainer.runtime.device).manual_seed(0)
    batches = batch_rows(store, plan.numerics_batch, plan.numerics_steps)
    losses = [trainer.step(idx, trainer.p.lr, gen)[0] for idx in batches]
    return losses, scaler_state(trainer.update)


def meta_train_curve(check: Check, precision: Precision) -> tuple[list[float], dict[str, Any]]:
    """Query losses of ``numerics_steps // 2`` MetaTrainer.learn meta-batches (eager) in ``precision``."""
    case = check.plan.meta_train
    meta = meta_config(case.meta_batch, case.inner_steps)
    cfg, runtime = check.target.runtime(meta, precision=precision)
    net, t = case.net, meta.meta_batch
    store = random_store(16, QUERY + meta.shot + 4, net.size, net.channels, "train", seed=4)
    trainer = MetaTrainer(cfg, project_learner(net, meta, runtime), store, net.preprocess(), runtime)
    losses = []
    for j in range(max(check.plan.numerics_steps // 2, 2)):
        batch = TaskBatch.of([trainer.sampler.episode(i) for i in range(j * t, (j + 1) * t)])
        losses.append(trainer.learn(batch, step_seed=j, total=t)[0])
    return losses, scaler_state(trainer.update)


def compare_curves(losses: list[float], fp32: list[float]) -> dict[str, Any]:
    half = len(fp32) // 2
    first = abs(losses[0] - fp32[0]) / abs(fp32[0])
    late = abs(float(np.mean(losses[half:])) - float(np.mean(fp32[half:]))) / abs(float(np.mean(fp32[half:])))
    out: dict[str, Any] = {"first_step_gap": first, "second_half_mean_gap": late}
    if not all(math.isfinite(x) for x in losses):
        out["error"] = "non-finite loss"
    elif first > FIRST_TOLERANCE or late > LOSS_TOLERANCE:
        out["error"] = (
            f"outside the tolerance: first-step gap {100 * first:.2f} %, second-half gap {100 * late:.2f} %"
        )
    return out


def numerics_section(check: Check) -> dict[str, Any]:
    results: dict[str, Any] = {
        "pretrain_steps": check.plan.numerics_steps,
        "pretrain_batch": check.plan.numerics_batch,
        "tolerance": f"first step's loss within {100 * FIRST_TOLERANCE:.0f} % of fp32's, mean loss of the second "
        f"half of the steps within {100 * LOSS_TOLERANCE:.0f} %",
    }
    curves: dict[str, list[float]] = {}

    def run(phase: str, precision: Precision) -> dict[str, Any]:
        if precision != "fp32" and f"{phase}_fp32" not in curves:
            raise Skip("needs the fp32 curve")
        curve = pretrain_curve if phase == "pretrain" else meta_train_curve
        losses, state = curve(check, precision)
        curves[f"{phase}_{precision}"] = losses
        out: dict[str, Any] = {"losses": losses, **state}
        if precision == "fp16" and not state["scaler_enabled"]:
            out["error"] = "fp16 ran without a loss scaler"
        elif precision != "fp32":
            out.update(compare_curves(losses, curves[f"{phase}_fp32"]))
        return out

    for phase in ("pretrain", "meta_train"):
        for precision in PRECISIONS:
            part(results, f"{phase}_{precision}", lambda ph=phase, p=precision: run(ph, p))
    return results

"""Pre-training: a plain fp32 step (``reference.py``) against the project's ``Pretrainer.step``, plus the
FLOP rate of both against the matmul peak measured in the same run.

The project's figure includes what its step does: uint8 -> float, batched augmentation, autocast and
channels_last; the reference gets ready fp32 tensors.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fixtures import PRETRAIN_CLASSES, Net, Target, random_store
from metatransfer.config import ModelConfig, Precision, PretrainConfig
from metatransfer.data.augment import to_float
from metatransfer.data.store import ImageStore
from metatransfer.device import CompiledForward
from metatransfer.train.pretrain import Pretrainer
from reference import reference_pretrain_step
from timing import Row, alternate, rate, seconds, sync


@dataclass(frozen=True)
class PretrainCase:
    net: Net
    batch: int


def pretrainer(
    net: Net,
    batch: int,
    target: Target,
    store: ImageStore,
    *,
    precision: Precision = "auto",
    channels_last: bool = True,
    compile: bool = False,
) -> Pretrainer:
    """The project's phase-1 trainer for ``net`` on ``store`` (the project's default optimizer and
    augmentation), built from a config as ``mtl pretrain`` builds it."""
    cfg, runtime = target.runtime(precision=precision, channels_last=channels_last, compile=compile)
    cfg = dataclasses.replace(
        cfg,
        model=ModelConfig(net.name, dict(net.args)),
        pretrain=PretrainConfig(batch_size=batch, lr=0.05),
    )
    trainer = Pretrainer(cfg, store, runtime, pre=net.preprocess())
    trainer.model.train()
    return trainer


def compiles(trainer: Pretrainer) -> bool:
    """Whether the trainer itself runs a compiled forward (``compile: true`` reaching phase 1)."""
    return any(isinstance(v, CompiledForward) for v in vars(trainer).values())


def compile_forward(trainer: Pretrainer) -> None:
    """Swap the step's forward for the project's ``CompiledForward``: what ``compile: true`` would give
    phase 1 where the trainer does not compile on its own."""
    trainer.forward = CompiledForward(trainer.forward)  # type: ignore[assignment]


def batch_rows(store: ImageStore, batch: int, count: int) -> list[torch.Tensor]:
    """``count`` random index batches [batch] over the store, the same for every path."""
    return [
        torch.from_numpy(np.random.default_rng(s).choice(len(store), batch, replace=False))
        for s in range(count)
    ]


def step_rate(trainer: Pretrainer, batches: list[torch.Tensor], warm_up: int = 1) -> tuple[float, float]:
    """(seconds of the first ``warm_up`` steps, images/s of ``Pretrainer.step`` over the other ``batches``)."""
    gen = torch.Generator(device=trainer.runtime.device).manual_seed(0)
    lr, device = trainer.p.lr, trainer.runtime.device
    warm_s = seconds(lambda: [trainer.step(idx, lr, gen) for idx in batches[:warm_up]], device)
    timed = batches[warm_up:]
    images = sum(len(idx) for idx in timed)
    return warm_s, rate(images, lambda: [trainer.step(idx, lr, gen) for idx in timed], device)


def flops_per_image(model: nn.Module, net: Net, device: torch.device) -> float:
    """FLOPs of one image's fp32 forward+backward through ``model``: the reference's step on a batch of
    2, counted by torch (its SGD update adds no counted FLOPs)."""
    probe = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format)
    x = torch.randn(2, net.channels, net.size, net.size, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        reference_pretrain_step(probe, torch.optim.SGD(probe.parameters(), lr=0.0), x, y)
    return counter.get_total_flops() / 2


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n ``torch.mm`` in ``dtype`` over ``repeats`` timings of 4 products."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    sync(device)
    best = min(seconds(lambda: [torch.mm(a, b) for _ in range(4)], device) for _ in range(repeats))
    return 4 * 2 * n**3 / best / 1e9


def pretrain_row(case: PretrainCase, target: Target, rounds: int) -> tuple[Row, Pretrainer]:
    """Per round one reference step and one ``Pretrainer.step`` on the same images, alternated."""
    net, b = case.net, case.batch
    store = random_store(PRETRAIN_CLASSES, 2 * b // PRETRAIN_CLASSES + 1, net.size, net.channels, "train")
    trainer = pretrainer(net, b, target, store)
    device = trainer.runtime.device
    reference = copy.deepcopy(trainer.model).float().to(memory_format=torch.contiguous_format).train()
    p = trainer.p  # the reference's SGD has the project's settings (the lr does not change the speed)
    ref_opt = torch.optim.SGD(
        reference.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay
    )
    batches = batch_rows(store, b, rounds + 1)
    pre = trainer.pre

    def ready(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.sort(idx.numpy())
        x = to_float(torch.from_numpy(store.images[rows]), pre.mean, pre.std).to(device)
        return x, torch.from_numpy(store.labels[rows]).to(device)

    ref_batches = [ready(idx) for idx in batches]
    gen = torch.Generator(device=device).manual_seed(0)

    def reference_round(k: int) -> float:
        return rate(b, lambda: reference_pretrain_step(reference, ref_opt, *ref_batches[k]), device)

    def project_round(k: int) -> float:
        return rate(b, lambda: trainer.step(batches[k], trainer.p.lr, gen), device)

    out = alternate(reference_round, project_round, rounds)
    row = Row(
        "pre-train",
        f"pre-train {net.label}, batch {b}",
        "images/s",
        tuple(out.reference),
        tuple(out.project),
        f"per round 1 step each; project: Pretrainer.step, with uint8->float and batched augmentation "
        f"({trainer.runtime.precision}, channels_last); the reference gets ready fp32 tensors",
    )
    return row, trainer


def flop_rows(row: Row, flops: float, peaks: tuple[float, float], precision: str) -> list[Row]:
    """GFLOP/s rows from a pre-train row's images/s: achieved, and as % of each path's own matmul peak
    (``peaks``: the reference's fp32 one, the one of the project's ``precision``)."""
    peak32, own = peaks
    ref_g = tuple(r * flops / 1e9 for r in row.reference)
    proj_g = tuple(p * flops / 1e9 for p in row.project)
    base = row.figure.replace("pre-train ", "")
    return [
        Row(
            "flops",
            f"matmul peak (torch.mm), fp32 / {precision}",
            "GFLOP/s",
            (peak32,),
            (own,),
            "best of runs before and after the steps",
            ratio=False,
        ),
        Row(
            "flops",
            f"{base}, achieved",
            "GFLOP/s",
            ref_g,
            proj_g,
            f"{flops / 1e9:.2f} GFLOP per image (fp32 forward+backward, FlopCounterMode)",
        ),
        Row(
            "flops",
            f"{base}, % of own matmul peak",
            "%",
            tuple(100 * g / peak32 for g in ref_g),
            tuple(100 * g / own for g in proj_g),
            f"reference vs the fp32 peak, project vs the {precision} peak",
            ratio=False,
        ),
    ]


PROFILE_FAMILIES = {  # op-name fragments; an op counts in the first family it matches
    "convolution": ("convolution",),
    "batch_norm": ("batch_norm",),
    "activation": ("relu", "threshold"),
    "max_pool": ("max_pool",),
    "copies_and_casts": ("copy_", "to_copy", "contiguous", "clone"),
}


def profile_step(step: Callable[[], object], path: Path) -> dict[str, float]:
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

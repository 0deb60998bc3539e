"""Side-by-side speed of this project's paths and the original MTL loop, in one process and one run.

Usage: ``python benchmarks/run.py --out benchmarks/results [--quick] [--threads N] [--only SECTION,...]``.

Each row times the reference loop (``reference.py``, the original code's way) and the project's own
function (``Pretrainer.step``, ``MetaTrainer.learn``, ``extract_features`` + ``evaluate_features``) in
alternating rounds after a warm-up round, on the same backbone, task shape and random uint8 data, and
reports every speed-up as the median of the per-round ratios with its min–max. Writes ``bench.md`` and
``bench.json`` (and ``profile_<precision>_step.txt``) into ``--out`` and prints the table; the previous
``bench.json`` in ``--out`` is kept as ``bench.previous.json`` and its speed-ups are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fixtures import Net, Target
from meta_bench import MetaTestCase, MetaTrainCase, meta_test, meta_train
from pretrain_bench import PretrainCase, flop_rows, flops_per_image, matmul_peak, pretrain_row, profile_step
from report import add_only, compare, cpu_name, markdown, only
from timing import Row

SECTIONS = ("pretrain", "meta-train", "meta-test")
INNER_STEPS = 100  # meta-train and meta-test, both paths (the original code's update_step)
BUDGET_S = 840  # rows that would end the run past this are dropped (whole rows, never rounds)


@dataclass(frozen=True)
class Plan:
    rounds: int
    pretrain: tuple[PretrainCase, ...]  # the first one also gives the flops rows
    meta_train: tuple[MetaTrainCase, ...]
    meta_test: MetaTestCase
    peak_n: int


@dataclass(frozen=True)
class Job:
    """Rows timed together: ``run()`` returns them and any extra figures for the run's info."""

    section: str
    key: str
    run: Callable[[], tuple[list[Row], dict[str, Any]]]


RESNET12 = "resnet12"
FULL = Plan(
    rounds=5,
    pretrain=(PretrainCase(Net(RESNET12, 84), batch=16),),
    meta_train=(
        MetaTrainCase(Net(RESNET12, 84), meta_batch=4, inner_steps=INNER_STEPS, compile=True),
        MetaTrainCase(Net(RESNET12, 32), meta_batch=4, inner_steps=INNER_STEPS),
        MetaTrainCase(Net("conv4", 28, channels=1), meta_batch=4, inner_steps=INNER_STEPS, per_round=4),
    ),
    # CIFAR-FS's test classes (20) with 100 of their 600 images at 32 px: the project extracts the
    # pool's features in every round, and the whole split made this row a third of the run.
    meta_test=MetaTestCase(Net(RESNET12, 32), 20, 100, 2, (600, 10_000), INNER_STEPS),
    peak_n=2048,
)
SMALL = {"widths": [32, 64, 128, 256]}
QUICK = Plan(
    rounds=5,
    pretrain=(PretrainCase(Net(RESNET12, 32, args=SMALL), batch=32),),
    meta_train=(
        MetaTrainCase(Net(RESNET12, 32, args=SMALL), meta_batch=4, inner_steps=INNER_STEPS),
        MetaTrainCase(Net("conv4", 28, channels=1), meta_batch=4, inner_steps=INNER_STEPS, per_round=2),
    ),
    meta_test=MetaTestCase(Net(RESNET12, 32, args=SMALL), 20, 40, 1, (600, 2_000), INNER_STEPS),
    peak_n=1024,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pretrain_job(
    case: PretrainCase, plan: Plan, target: Target, out: Path
) -> tuple[list[Row], dict[str, Any]]:
    """The pre-train row with its flops rows: matmul peaks measured before and after its steps (the
    best of both, so a burst of load cannot lower it), FLOPs counted by torch, one step profiled."""
    device, fast = target.torch_device, target.runtime()[1].amp_dtype or torch.float32

    def peak_pair() -> tuple[float, float]:
        """Matmul peaks in fp32 and in the project's precision (a slow emulated bf16 is never timed)."""
        fp32 = matmul_peak(plan.peak_n, torch.float32, device)
        return fp32, fp32 if fast == torch.float32 else matmul_peak(plan.peak_n, fast, device)

    peaks = [peak_pair()]
    row, trainer = pretrain_row(case, target, plan.rounds)
    peaks.append(peak_pair())
    per_image = flops_per_image(trainer.model, case.net, device)
    best = (max(p[0] for p in peaks), max(p[1] for p in peaks))
    profile = profile_step(
        partial(trainer.step, torch.arange(case.batch), trainer.p.lr),
        out / f"profile_{trainer.runtime.precision}_step.txt",
    )
    # Nearly all counted FLOPs are convolutions: their rate inside the conv kernels alone shows how
    # much of the gap to the peak is the convolutions and how much the ops around them.
    conv_s = max(profile.pop("convolution_seconds"), 1e-9)
    profile["convolution_gflops"] = per_image * case.batch / conv_s / 1e9
    flops = flop_rows(row, per_image, best, trainer.runtime.precision)
    return [*flops, row], {"gflop_per_image": per_image / 1e9, "profile": profile}


def jobs(plan: Plan, target: Target, out: Path) -> list[Job]:
    """The rows in the order they are run, most wanted first: meta-train at the paper's 84 px, then
    meta-test, pre-training with its flops rows, and the smaller meta-train rows."""
    r = plan.rounds

    def meta_train_job(case: MetaTrainCase) -> tuple[list[Row], dict[str, Any]]:
        return [meta_train(case, target, r).row], {}

    def meta_test_job() -> tuple[list[Row], dict[str, Any]]:
        return meta_test(plan.meta_test, target, r).rows, {}

    meta = [
        Job("meta-train", f"meta-train {c.net.label}", partial(meta_train_job, c)) for c in plan.meta_train
    ]
    test = Job("meta-test", f"meta-test {plan.meta_test.net.label}", meta_test_job)
    pre = [
        Job("pretrain", f"pre-train {c.net.label}", partial(pretrain_job, c, plan, target, out))
        for c in plan.pretrain
    ]
    return [meta[0], test, *pre, *meta[1:]]


def run_jobs(
    todo: list[Job], budget_s: float, took_before: dict[str, float]
) -> tuple[list[Row], dict[str, Any]]:
    """Run the jobs in order; a job is dropped when the budget is spent or when its time in the
    previous run would not fit in what is left. Returns the rows and the run's timing info."""
    start = time.perf_counter()
    rows: list[Row] = []
    extra: dict[str, Any] = {"job_seconds": {}, "dropped": []}
    for job in todo:
        left = budget_s - (time.perf_counter() - start)
        before = took_before.get(job.key, 0.0)
        if left <= 0 or before > left:
            extra["dropped"].append(
                f"{job.key} ({left:.0f} s of the {budget_s:.0f}-s budget left; it took {before:.0f} s last run)"
            )
            log(f"{job.key}: dropped, {left:.0f} s left")
            continue
        log(f"{job.key}: a warm-up round, then the timed rounds")
        t0 = time.perf_counter()
        job_rows, job_extra = job.run()
        extra["job_seconds"][job.key] = time.perf_counter() - t0
        extra.update(job_extra)
        rows += job_rows
        spreads = ", ".join(r.speedup.text("x") for r in job_rows if r.speedup)
        log(f"  {extra['job_seconds'][job.key]:.0f} s; speed-up {spreads}")
    return rows, extra


def read_previous(path: Path, quick: bool) -> dict[str, Any] | None:
    """The bench.json at ``path`` if it exists and was run in the same mode (--quick or not)."""
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return payload if payload.get("info", {}).get("quick") == quick else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="folder for bench.md/json"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, the same rounds")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help=f"drop rows past this (default {BUDGET_S})"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = OMP_NUM_THREADS or all cores)"
    )
    add_only(parser, list(SECTIONS))
    args = parser.parse_args(argv)
    sections = only(parser, args.only, list(SECTIONS))
    target = Target("cpu", args.threads)
    threads = target.threads_or_default()
    torch.set_num_threads(threads)
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    json_path = args.out / "bench.json"
    previous = read_previous(json_path, args.quick)
    took_before = (previous or {}).get("info", {}).get("job_seconds", {})
    todo = [j for j in jobs(plan, target, args.out) if j.section in sections]
    rows, extra = run_jobs(todo, args.budget_s, took_before)
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "precision": target.runtime()[1].precision,
        "quick": args.quick,
        "rounds": plan.rounds,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "seconds": time.perf_counter() - start,
        "inner_steps": INNER_STEPS,
        **extra,
    }
    comparison = compare(rows, previous)
    text = markdown(rows, info, comparison, previous)
    if json_path.exists():
        json_path.replace(args.out / "bench.previous.json")
    (args.out / "bench.md").write_text(text)
    payload = {"info": info, "rows": [r.to_json() for r in rows], "against_previous": comparison}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

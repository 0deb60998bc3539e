"""The GPU check's measuring sections: device and peaks, pre-training throughput, meta-training against
the reference loop, and meta-test. Each takes the run's `Check` and returns its figures as a dict;
figures later sections need (peaks, rates) also go into ``check.measured``.
"""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from fixtures import PRETRAIN_CLASSES, Net, Target, random_store
from meta_bench import MetaTestCase, MetaTrainCase, meta_test, meta_train
from metatransfer.config import Precision, load_config
from metatransfer.data.readers import with_data_root
from metatransfer.data.store import ImageStore, open_split
from pretrain_bench import (
    batch_rows,
    compile_forward,
    compiles,
    flops_per_image,
    matmul_peak,
    pretrainer,
    step_rate,
)
from timing import Row

T = TypeVar("T")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mini-imagenet.yaml"


class Skip(Exception):
    """A section or part that cannot run here; its message is the reason."""


@dataclass(frozen=True)
class GpuPlan:
    peak_n: int
    net: Net  # the paper-scale backbone (toy-sized in the smoke)
    pretrain_batch: int
    pretrain_steps: int  # timed, after `pretrain_warm_up` steps
    pretrain_warm_up: int
    meta_train: MetaTrainCase
    meta_rounds: int
    meta_test: MetaTestCase
    test_rounds: int
    numerics_steps: int
    numerics_batch: int
    dist_timeout_s: int
    compile_ok: bool  # False in the CPU smoke: compiling takes minutes on a CPU
    small_data: bool  # True: random toy images even where real data is present


@dataclass
class Check:
    """One run of the check: where it runs, what it runs, and the figures measured so far."""

    target: Target
    plan: GpuPlan
    out: Path
    data_root: Path | None
    measured: dict[str, Any] = field(default_factory=dict)


def part(results: dict[str, Any], name: str, fn: Any) -> None:
    """``results[name]`` = fn()'s dict with status "measured" ("failed" where it holds an "error"), or
    the reason or error it stopped with."""
    try:
        out = fn()
        results[name] = {"status": "failed" if "error" in out else "measured", **out}
    except Skip as s:
        results[name] = {"status": "skipped", "reason": str(s)}
    except Exception as exc:  # one broken part must not cost the rest of the lent time
        results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def compile_fallback(fn: Callable[[], T]) -> tuple[T, str | None]:
    """fn()'s result, and the warning CompiledForward gives where compiling failed and it ran eagerly."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    return out, failed[0] if failed else None


def device_section(check: Check) -> dict[str, Any]:
    device = check.target.torch_device
    cuda = device.type == "cuda"
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({check.target.threads_or_default()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if cuda else False,
    }
    n = check.plan.peak_n
    peaks = {"fp32": matmul_peak(n, torch.float32, device), "bf16": matmul_peak(n, torch.bfloat16, device)}
    if cuda:  # fp32 convolutions run in TF32 by default (cudnn.allow_tf32), so their peak is TF32's
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            peaks["tf32"] = matmul_peak(n, torch.float32, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    check.measured["peaks"] = peaks
    return {**info, "matmul_n": n, "peak_gflops": peaks}


def real_split(check: Check, split: str) -> ImageStore | None:
    """The config's miniImageNet split at its size if the data is present (None otherwise)."""
    if check.plan.small_data or check.data_root is None:
        return None
    cfg = with_data_root(load_config(CONFIG), check.data_root)
    try:
        store = open_split(cfg.data, split, progress=False)
        check.measured.setdefault("split_sizes", {})[split] = len(store)
        return store
    except Exception as exc:  # absent or unreadable data: the check runs on random images instead
        check.measured.setdefault("data_errors", []).append(f"{split}: {type(exc).__name__}: {exc}")
        return None


def data_note(store: ImageStore | None, split: str) -> str:
    return (
        f"real miniImageNet {split} split ({len(store):,} images)"
        if store is not None
        else "random uint8 images"
    )


VARIANTS: dict[str, tuple[Precision, bool, bool]] = {  # name -> (precision, channels_last, compile)
    "fp32": ("fp32", False, False),
    "bf16_channels_last": ("bf16", True, False),
    "bf16_channels_last_compile": ("bf16", True, True),
}


def pretrain_section(check: Check) -> dict[str, Any]:
    plan, net, device = check.plan, check.plan.net, check.target.torch_device
    real = real_split(check, "train")
    per_class = plan.pretrain_batch * (plan.pretrain_steps + plan.pretrain_warm_up) // PRETRAIN_CLASSES + 1
    store = real or random_store(PRETRAIN_CLASSES, per_class, net.size, net.channels, "train")
    batches = batch_rows(store, plan.pretrain_batch, plan.pretrain_steps + plan.pretrain_warm_up)
    peaks = check.measured.get("peaks", {})
    results: dict[str, Any] = {
        "net": net.label,
        "batch": plan.pretrain_batch,
        "data": data_note(real, "train"),
    }
    flops: list[float] = []

    def variant(name: str) -> dict[str, Any]:
        precision, channels_last, compile = VARIANTS[name]
        if compile and not plan.compile_ok:
            raise Skip(
                "cpu-smoke: torch.compile's one-time cost (minutes on a CPU) does not fit; tests/test_meta.py covers it"
            )
        trainer = pretrainer(
            net,
            plan.pretrain_batch,
            check.target,
            store,
            precision=precision,
            channels_last=channels_last,
            compile=compile,
        )
        note = "Pretrainer.step"
        if compile and not compiles(trainer):
            compile_forward(trainer)
            note = "Pretrainer.step with its forward swapped for CompiledForward: phase 1 does not compile on its own (compile: true reaches meta-training only)"
        if not flops:
            flops.append(flops_per_image(trainer.model, net, device))
        (warm_s, images_s), fallback = compile_fallback(
            lambda: step_rate(trainer, batches, plan.pretrain_warm_up)
        )
        out: dict[str, Any] = {"images_per_s": images_s, "warm_up_s": warm_s, "how": note}
        if fallback:
            out["error"] = f"ran eagerly: {fallback}"
        peak_name = "bf16" if precision == "bf16" else ("tf32" if "tf32" in peaks else "fp32")
        if peak_name in peaks:
            gflops = images_s * flops[0] / 1e9
            out.update(
                {"gflops": gflops, "peak": peak_name, "percent_of_peak": 100 * gflops / peaks[peak_name]}
            )
        return out

    for name in VARIANTS:
        part(results, name, lambda name=name: variant(name))
    if flops:
        results["gflop_per_image"] = flops[0] / 1e9
    # The projection uses the rate of the settings configs/mini-imagenet.yaml runs phase 1 with.
    used = "bf16_channels_last"
    if results.get(used, {}).get("status") == "measured":
        check.measured["pretrain_images_per_s"] = results[used]["images_per_s"]
        check.measured["pretrain_rate_from"] = used
    return results


def speedup(row: Row) -> dict[str, Any]:
    s = row.speedup
    return {
        "reference_tasks_per_s": statistics.median(row.reference),
        "project_tasks_per_s": statistics.median(row.project),
        "speedup": None if s is None else {"median": s.median, "min": s.low, "max": s.high},
        "rounds": len(row.project),
        "how": row.note,
    }


def meta_train_section(check: Check) -> dict[str, Any]:
    plan = check.plan
    results: dict[str, Any] = {}
    for shot in (1, 5):
        case = dataclasses.replace(plan.meta_train, shot=shot)

        def run(case: MetaTrainCase = case) -> dict[str, Any]:
            result, fallback = compile_fallback(lambda: meta_train(case, check.target, plan.meta_rounds))
            check.measured.setdefault("meta_step_s", {})[case.shot] = result.step_s
            check.measured.setdefault("meta_warm_up_s", {})[case.shot] = result.warm_up_s
            return {
                **speedup(result.row),
                "figure": result.row.figure,
                "warm_up_s": result.warm_up_s,
                "step_s": result.step_s,
            } | ({"error": f"the compiled step ran eagerly: {fallback}"} if fallback else {})

        part(results, f"{shot}shot", run)
    return results


def meta_test_section(check: Check) -> dict[str, Any]:
    plan = check.plan
    real = real_split(check, "test")
    result = meta_test(plan.meta_test, check.target, plan.test_rounds, pool=real)
    check.measured["features_per_s"] = result.features_per_s
    check.measured["linear_episodes_per_s"] = min(result.episodes_per_s.values())
    out: dict[str, Any] = {"data": data_note(real, "test"), "features_per_s": result.features_per_s}
    for row, count in zip(result.rows, plan.meta_test.episodes, strict=True):
        s = row.speedup
        out[f"{count}_episodes"] = {
            "project_episodes_per_s": statistics.median(row.project),
            "reference_episodes_per_s": statistics.median(row.reference),
            "speedup": None if s is None else {"median": s.median, "min": s.low, "max": s.high},
            "evaluate_only_episodes_per_s": result.episodes_per_s[count],
            "how": row.note,
        }
    return out

"""One prepared check of the paper-scale path on a CUDA machine, within minutes of lent GPU time.

Usage (from the repository root)::

    pip install -e . && python benchmarks/gpu_check.py --out gpu-check     # on the GPU machine
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu-check         # the same code at toy sizes, < 60 s

Sections, in order: device (name, versions, measured matmul peaks), pretrain (ResNet-12 64-160-320-640
at 84 px, images/s in fp32, bf16 + channels_last and compiled, as % of peak), meta_train (tasks/s
against the reference loop, 5-way 1- and 5-shot, 15 queries), meta_test (episodes/s at 600 and
10,000 episodes), distributed (``mtl pretrain`` and ``mtl meta-train`` under torchrun, nccl on CUDA),
numerics (fp32 vs bf16 vs fp16 with its loss scaler on the same batches), projection (the wall time of
``mtl run --config configs/mini-imagenet.yaml`` from the measured rates).

Each section is marked measured, skipped (with the reason) or failed (with the error), and one that
fails does not stop the next. DIR/gpu_check.md and DIR/gpu_check.json are rewritten after every
section, so a run cut short still leaves what it measured. Real miniImageNet is used where
``--data-root`` (default: shared/data or ../shared/data if present) holds it; random uint8 images
otherwise, and the report says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fixtures import PAPER_WIDTHS, Net, Target
from gpu_numerics import numerics_section
from gpu_projection import projection_section
from gpu_report import markdown
from gpu_runs import distributed_section
from gpu_sections import (
    Check,
    GpuPlan,
    Skip,
    device_section,
    meta_test_section,
    meta_train_section,
    pretrain_section,
)
from meta_bench import MetaTestCase, MetaTrainCase
from report import add_only, only

ROOT = Path(__file__).resolve().parents[1]
PAPER_NET = Net("resnet12", 84, args={"widths": PAPER_WIDTHS})
GPU = GpuPlan(
    peak_n=8192,
    net=PAPER_NET,
    pretrain_batch=128,  # configs/mini-imagenet.yaml's
    pretrain_steps=20,
    pretrain_warm_up=3,
    meta_train=MetaTrainCase(PAPER_NET, meta_batch=4, inner_steps=100, compile=True),
    meta_rounds=5,
    meta_test=MetaTestCase(PAPER_NET, 20, 600, reference_episodes=5, episodes=(600, 10_000), inner_steps=100),
    test_rounds=3,
    numerics_steps=30,
    numerics_batch=64,
    dist_timeout_s=240,
    compile_ok=True,
    small_data=False,
)
TOY_NET = Net("resnet12", 16, args={"widths": [8, 16, 32, 64]})
SMOKE = GpuPlan(
    peak_n=256,
    net=TOY_NET,
    pretrain_batch=8,
    pretrain_steps=2,
    pretrain_warm_up=1,
    meta_train=MetaTrainCase(TOY_NET, meta_batch=2, inner_steps=5),
    meta_rounds=2,
    meta_test=MetaTestCase(TOY_NET, 5, 20, reference_episodes=1, episodes=(20, 50), inner_steps=5),
    test_rounds=2,
    numerics_steps=4,
    numerics_batch=8,
    dist_timeout_s=90,
    compile_ok=False,
    small_data=True,
)
Section = Callable[[Check], dict[str, Any]]
# name -> (function, seconds it needs at least on the GPU; with fewer left it is skipped)
SECTIONS: dict[str, tuple[Section, float]] = {
    "device": (device_section, 10),
    "pretrain": (pretrain_section, 100),
    "meta_train": (meta_train_section, 100),
    "meta_test": (meta_test_section, 40),
    "distributed": (distributed_section, 60),
    "numerics": (numerics_section, 20),
    "projection": (projection_section, 0),  # cheap: always runs
}


def status_of(results: dict[str, Any]) -> tuple[str, str]:
    """A section's status from its parts: failed if any failed, skipped if all were, else measured."""
    parts = [v for v in results.values() if isinstance(v, dict) and "status" in v]
    failed = [
        f"{k}: {v['error']}"
        for k, v in results.items()
        if isinstance(v, dict) and v.get("status") == "failed"
    ]
    if failed:
        return "failed", "; ".join(failed)
    if parts and all(p["status"] == "skipped" for p in parts):
        return "skipped", "; ".join(p["reason"] for p in parts)
    return "measured", ""


def run_section(name: str, fn: Section, check: Check) -> dict[str, Any]:
    """Run one section; whatever it raises becomes its status, never the end of the check."""
    t0 = time.perf_counter()
    out: dict[str, Any]
    try:
        results = fn(check)
        status, why = status_of(results)
        out = {"status": status, "results": results}
        if why:
            out["error" if status == "failed" else "reason"] = why
    except Skip as s:
        out = {"status": "skipped", "reason": str(s)}
    except Exception as exc:  # one broken section must not cost the rest of the lent time
        out = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }
    out["seconds"] = time.perf_counter() - t0
    return out


def default_data_root() -> Path | None:
    for candidate in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if (candidate / "mini-imagenet").is_dir():
            return candidate
    return None


def run_check(check: Check, budget_s: float, smoke: bool, sections: Sequence[str]) -> dict[str, Any]:
    start = time.perf_counter()
    payload: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "gpu",
        "device": torch.cuda.get_device_name() if check.target.device == "cuda" else "CPU",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "budget_s": budget_s,
        "data_root": str(check.data_root) if check.data_root else None,
        "sections": {},
    }
    for name in sections:
        fn, needs = SECTIONS[name]
        left = budget_s - (time.perf_counter() - start)
        if not smoke and needs > 0 and left < needs:
            payload["sections"][name] = {
                "status": "skipped",
                "reason": f"time budget: {left:.0f} s left, needs about {needs:.0f} s",
            }
        else:
            print(f"[{time.perf_counter() - start:5.0f} s] {name} ...", file=sys.stderr, flush=True)
            payload["sections"][name] = run_section(name, fn, check)
            s = payload["sections"][name]
            print(
                f"[{time.perf_counter() - start:5.0f} s] {name}: {s['status']} {s.get('reason') or s.get('error') or ''}"[
                    :400
                ],
                file=sys.stderr,
                flush=True,
            )
        payload["seconds"] = time.perf_counter() - start
        payload["data_errors"] = check.measured.get("data_errors", [])
        write(check.out, payload)
    return payload


def write(out: Path, payload: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(payload))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="the same code at toy sizes on the CPU (< 60 s)"
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="folder holding mini-imagenet/ (optional)"
    )
    parser.add_argument(
        "--budget-s", type=float, help="seconds for all sections (default 420; the smoke's 60)"
    )
    add_only(parser, list(SECTIONS))
    args = parser.parse_args(argv)
    sections = only(parser, args.only, list(SECTIONS))
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --cpu-smoke to check the script at toy sizes on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    target = Target("cpu") if args.cpu_smoke else Target("cuda")
    if args.cpu_smoke:
        torch.set_num_threads(target.threads_or_default())
    data_root = None if args.cpu_smoke else (args.data_root or default_data_root())
    check = Check(target, SMOKE if args.cpu_smoke else GPU, args.out, data_root)
    budget = args.budget_s or (60 if args.cpu_smoke else 420)
    payload = run_check(check, budget, args.cpu_smoke, sections)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

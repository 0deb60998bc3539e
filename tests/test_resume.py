"""Kill a run with SIGKILL at start-up, before its first checkpoint and at random moments after one; resume
it (by itself, and with --resume) and get the uninterrupted run's exact files and metrics."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metatransfer.runs import CONFIG_FILE as CONFIG
from metatransfer.runs import load_state

from tiny import write_config, write_pattern_folder

TIMING = ("images_per_s", "epoch_s", "val_s", "tasks_per_s")  # measured, so never equal run to run


def _env() -> dict[str, str]:
    # One thread: CPU kernels are then deterministic run to run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(config: Path, out: Path, phase: str, pretrained: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "metatransfer", phase, "--config", str(config), "--out", str(out)]
    return cmd + (["--pretrained", str(pretrained)] if pretrained else [])


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - t0


def _kill_when(cmd: list[str], ready: Callable[[], bool], seconds: float) -> bool:
    """Start `cmd`, wait until `ready()` (polled every 10 ms), then SIGKILL it `seconds` later.

    True if it was killed before it finished."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.01)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _written(path: Path) -> Callable[[], bool]:
    """Whether `path` has been (re)written since now: by the process about to start, not an earlier one."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    return lambda: path.exists() and path.stat().st_mtime_ns != before


def _metrics(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _same_results(reference: Path, resumed: Path) -> None:
    """Every tensor of every model file, every metrics value but the timings, and the summary."""
    files = sorted(p.name for p in reference.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in resumed.glob("*.safetensors"))
    for name in files:
        ta, tb = load_file(reference / name), load_file(resumed / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}: {key}"
    (columns, expected), (got_columns, got) = _metrics(reference), _metrics(resumed)
    assert columns == got_columns and len(expected) == len(got)
    for row, (want, have) in enumerate(zip(expected, got, strict=True)):
        for column in set(columns) - set(TIMING):
            assert want[column] == have[column], f"metrics row {row}, {column}"
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, resumed)]
    for summary in summaries:
        for key in ("seconds", "backbone"):  # a duration and the run's own path
            summary.pop(key, None)
    assert summaries[0] == summaries[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    data = write_pattern_folder(tmp / "data")
    config = write_config(
        tmp / "cfg.yaml",
        data,
        tmp / "cache",
        pretrain={"epochs": 10, "batch_size": 16, "val_episodes": 10},
        meta={"tasks": 60, "val_every": 8, "val_episodes": 10},
    )
    return tmp, config


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "training_started"), [("pretrain", CONFIG), ("meta-train", "metrics.csv")])
def test_kill_and_resume_is_bit_identical(
    setup: tuple[Path, Path], phase: str, training_started: str
) -> None:
    """Kills land during start-up (the run folder just created), before the first checkpoint (training
    under way: pre-training's config written, meta-training's start validated and logged), and at random
    moments after checkpoints; the same command restarts or resumes by itself, and the last one resumes
    with --resume. It ends with the uninterrupted run's files and metrics."""
    tmp, config = setup
    pretrained = None
    if phase == "meta-train":
        pretrained = tmp / "pre-for-meta"
        if not (pretrained / "DONE").exists():
            _run(_command(config, pretrained, "pretrain", None))
    reference = tmp / f"{phase}-reference"
    _run(_command(config, reference, phase, pretrained))
    resumed = tmp / f"{phase}-killed"
    cmd = _command(config, resumed, phase, pretrained)
    for moment in ("start-up", "training"):
        # `_written` is taken now, after the previous kill, so a file that kill left does not count.
        ready = resumed.exists if moment == "start-up" else _written(resumed / training_started)
        assert _kill_when(cmd, ready, 0.0), f"the run finished before the {moment} kill"
        assert not (resumed / "state.pt").exists(), f"the {moment} kill landed after the first checkpoint"
    rng = np.random.default_rng(12345)
    killed = 0
    for _ in range(3):
        # Random moments after a checkpoint: mid-step, mid-validation or mid-write of the next one.
        killed += _kill_when(cmd, _written(resumed / "state.pt"), float(rng.uniform(0.0, 0.4)))
    assert killed >= 1, "no run was interrupted after a checkpoint; the kill points were all too late"
    assert (resumed / "state.pt").exists() and not (resumed / "DONE").exists()
    # --resume continues from the checkpoint: the rows up to it stay as they were, timings included.
    kept_until = int(load_state(resumed / "state.pt")["step"])
    kept = [r for r in _metrics(resumed)[1] if int(r["step"]) <= kept_until]
    _run([*cmd, "--resume"])
    assert _metrics(resumed)[1][: len(kept)] == kept
    _same_results(reference, resumed)

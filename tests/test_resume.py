"""Kill a run with SIGKILL at random moments, resume it, and get the uninterrupted run's exact weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import write_config, write_pattern_folder


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


def _kill_after_checkpoint(cmd: list[str], out: Path, seconds: float) -> bool:
    """Start `cmd`, wait until its run directory has a new checkpoint, then SIGKILL it `seconds` later.

    True if it was killed before it finished."""
    state = out / "state.pt"
    before = state.stat().st_mtime_ns if state.exists() else 0
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if state.exists() and state.stat().st_mtime_ns != before:
            break
        time.sleep(0.02)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


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


@pytest.mark.parametrize(
    ("phase", "weights", "kills"),
    [("pretrain", "backbone.safetensors", 3), ("meta-train", "last.safetensors", 3)],
)
def test_kill_and_resume_is_bit_identical(
    setup: tuple[Path, Path], phase: str, weights: str, kills: int
) -> None:
    tmp, config = setup
    pretrained = None
    if phase == "meta-train":
        pretrained = tmp / "pre-for-meta"
        if not (pretrained / "DONE").exists():
            _run(_command(config, pretrained, "pretrain", None))
    reference = tmp / f"{phase}-reference"
    _run(_command(config, reference, phase, pretrained))
    resumed = tmp / f"{phase}-killed"
    rng = np.random.default_rng(12345)
    killed = 0
    for _ in range(kills):
        # Random moments after a checkpoint: mid-step, mid-validation or mid-write of the next one.
        if _kill_after_checkpoint(
            _command(config, resumed, phase, pretrained), resumed, float(rng.uniform(0.0, 0.4))
        ):
            killed += 1
        if (resumed / "DONE").exists():
            break
    assert killed >= 1, "no run was interrupted; the kill points were all too late"
    if not (resumed / "DONE").exists():
        _run(
            _command(config, resumed, phase, pretrained)
        )  # resumes automatically: same config, state present
    _same_weights(reference / weights, resumed / weights)
    ref_rows = (reference / "metrics.csv").read_text().splitlines()
    res_rows = (resumed / "metrics.csv").read_text().splitlines()
    assert len(ref_rows) == len(res_rows)

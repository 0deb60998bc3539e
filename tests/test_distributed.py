"""torchrun with 2 CPU processes (gloo) gives the single-process results; a dead rank stops the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tiny import write_config, write_pattern_folder

FP32 = ["--set", "precision=fp32"]  # bf16 rounding would hide (or fake) a disagreement


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MTL_DIST_TIMEOUT": "60"}


def _mtl(*args: str) -> list[str]:
    return [sys.executable, "-m", "metatransfer", *args]


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "metatransfer",
        *args,
    ]


def _ok(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    data = write_pattern_folder(tmp / "data")
    config = write_config(
        tmp / "cfg.yaml",
        data,
        tmp / "cache",
        pretrain={"epochs": 2, "batch_size": 8},
        meta={"tasks": 12, "meta_batch": 2, "val_every": 4},
    )
    pre = tmp / "pre"
    _ok(_mtl("pretrain", "--config", str(config), "--out", str(pre), *FP32))
    return tmp, config, pre


def test_meta_test_matches_one_process(setup: tuple[Path, Path, Path]) -> None:
    tmp, config, pre = setup
    meta = tmp / "meta-for-test"
    _ok(_mtl("meta-train", "--config", str(config), "--pretrained", str(pre), "--out", str(meta), *FP32))
    csv = meta / "episodes-test-3way-1shot.csv"
    args = ("meta-test", str(meta), "--way", "3", "--query", "4", "--episodes", "31", *FP32)
    _ok(_mtl(*args))
    single = np.loadtxt(csv, delimiter=",", skiprows=1)
    csv.unlink()
    _ok(_torchrun(*args))
    double = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert single.shape == (31, 2)
    np.testing.assert_array_equal(single, double)


@pytest.mark.parametrize("ht", [False, True])
def test_meta_training_on_two_ranks_matches_one_process(setup: tuple[Path, Path, Path], ht: bool) -> None:
    tmp, config, pre = setup
    # With HT, one hard task per meta-batch: one rank learns it, the other only joins the all-reduce.
    args = (
        "meta-train",
        "--config",
        str(config),
        "--pretrained",
        str(pre),
        *FP32,
        "--set",
        f"meta.ht.enabled={ht}",
    )
    _ok(_mtl(*args, "--out", str(tmp / f"meta-1-{ht}")))
    _ok(_torchrun(*args, "--out", str(tmp / f"meta-2-{ht}")))
    one, two = (
        load_file(tmp / f"meta-1-{ht}" / "last.safetensors"),
        load_file(tmp / f"meta-2-{ht}" / "last.safetensors"),
    )
    trained = [k for k in one if k.endswith(("scale", "shift")) or k.startswith("theta")]
    assert trained
    assert any(not np.allclose(one[k].numpy(), 1.0) for k in trained if k.endswith("scale")), (
        "Phi did not move"
    )
    for key in trained:
        np.testing.assert_allclose(one[key].numpy(), two[key].numpy(), atol=1e-5, err_msg=key)
    rows = [(tmp / f"meta-{n}-{ht}" / "metrics.csv").read_text().count("\n") for n in (1, 2)]
    assert rows[0] == rows[1]


def _column(path: Path, name: str) -> np.ndarray:
    lines = path.read_text().splitlines()
    index = lines[0].split(",").index(name)
    return np.asarray([float(line.split(",")[index]) for line in lines[1:]])


def test_data_parallel_pretraining_tracks_one_process(setup: tuple[Path, Path, Path]) -> None:
    tmp, config, _ = setup
    # 2 ranks x 8 images see the same global batches of 16 as one process with batch 16.
    _ok(
        _mtl(
            "pretrain",
            "--config",
            str(config),
            "--out",
            str(tmp / "pre-1"),
            "--set",
            "pretrain.batch_size=16",
            *FP32,
        )
    )
    _ok(_torchrun("pretrain", "--config", str(config), "--out", str(tmp / "pre-2"), *FP32))
    one, two = (
        _column(tmp / "pre-1" / "metrics.csv", "train_loss"),
        _column(tmp / "pre-2" / "metrics.csv", "train_loss"),
    )
    assert len(one) == len(two) == 2
    # BatchNorm sees 8 instead of 16 images per rank and augmentation draws differ: close, not equal.
    np.testing.assert_allclose(one, two, rtol=0.1)


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def test_a_dead_rank_stops_the_job_and_the_run_resumes(setup: tuple[Path, Path, Path]) -> None:
    tmp, config, pre = setup
    out = tmp / "meta-killed"
    args = ("meta-train", "--config", str(config), "--pretrained", str(pre), "--out", str(out), *FP32)
    args += ("--set", "meta.tasks=400", "--set", "meta.val_every=8")
    cmd = _torchrun(*args)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (out / "state.pt").exists(), "the job wrote no checkpoint"
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "failed" in err.lower()
    assert not (out / "DONE").exists()
    done = _ok(_mtl(*args))  # the same config: resumes from the last checkpoint
    assert (out / "DONE").exists(), done.stdout

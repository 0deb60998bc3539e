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
import torch
from safetensors.torch import load_file

from metatransfer import distributed as dist
from metatransfer.config import load_config
from metatransfer.data.store import open_split
from metatransfer.device import resolve_runtime
from metatransfer.runs import load_state, load_weights
from metatransfer.train.pretrain import Pretrainer

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


# Data-parallel pre-training, the same command as one process and as 2 ranks of 8 images each. No
# augmentation: each rank would draw its own crops, which one process cannot reproduce.
PRE_ARGS = ("--set", "pretrain.augment.enabled=false", *FP32)


def _pretrain_command(config: Path, out: Path) -> list[str]:
    return _torchrun("pretrain", "--config", str(config), "--out", str(out), *PRE_ARGS)


@pytest.fixture(scope="module")
def two_ranks(setup: tuple[Path, Path, Path]) -> Path:
    """An uninterrupted 2-rank pre-training of 2 epochs (6 steps of 16 images each)."""
    tmp, config, _ = setup
    out = tmp / "pre-2"
    _ok(_pretrain_command(config, out))
    return out


@pytest.mark.slow
def test_data_parallel_pretraining_equals_one_process_on_the_same_global_batches(
    setup: tuple[Path, Path, Path], two_ranks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process steps on each global batch of 16 as the two ranks do together: each half of it
    (rank_share's contiguous halves) goes forward on its own, so BatchNorm sees 8 images as on a rank,
    and the two gradients are averaged before the SGD step, as DDP's all-reduce does. Without that
    all-reduce rank 0 would learn from its half alone and the weights would differ by far more than
    float rounding."""
    _, config, _ = setup
    cfg = load_config(config, [o for o in PRE_ARGS if o != "--set"])
    # The 2-rank view of the job, in one process: global batches of 16, no DDP wrapper.
    monkeypatch.setattr(dist, "context", lambda: dist.DistContext(rank=0, world_size=2, local_rank=0))
    monkeypatch.setattr(dist, "rank_share", lambda items: items)
    monkeypatch.setattr(dist, "wrap_data_parallel", lambda model, device: model)
    trainer = Pretrainer(cfg, open_split(cfg.data, "train", progress=False), resolve_runtime(cfg))
    assert trainer.global_batch == 16 and trainer.steps_per_epoch == 6
    one_rank_step = trainer.step
    params = list(trainer.model.parameters())

    def both_ranks_step(
        idx: torch.Tensor, lr: float, gen: torch.Generator | None = None, where: str = ""
    ) -> tuple[float, int]:
        trainer.opt.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:  # each half only accumulates its gradient
            m.setattr(trainer.opt, "zero_grad", lambda set_to_none=True: None)
            m.setattr(trainer.update, "step", lambda: None)
            first = one_rank_step(idx[:8], lr, gen, where)
            rank0_buffers = {k: b.clone() for k, b in trainer.model.named_buffers()}
            second = one_rank_step(idx[8:], lr, gen, where)
        for key, b in trainer.model.named_buffers():  # DDP broadcasts rank 0's BN statistics
            b.copy_(rank0_buffers[key])
        for p in params:
            if p.grad is not None:
                p.grad.div_(2)
        trainer.update.step()
        return (first[0] + second[0]) / 2, first[1] + second[1]

    monkeypatch.setattr(trainer, "step", both_ranks_step)
    start = {k: t.clone() for k, t in trainer.model.backbone.state_dict().items()}
    after: dict[str, dict[str, torch.Tensor]] = {}
    for epoch in range(cfg.pretrain.epochs):
        trainer.epoch(epoch)
        after[str(epoch + 1)] = {k: t.clone() for k, t in trainer.model.backbone.state_dict().items()}
    two, meta = load_weights(two_ranks / "backbone.safetensors")
    one = after[meta["epoch"]]  # the file holds the best epoch's backbone
    assert one.keys() == two.keys()
    assert any(not torch.allclose(start[k], t, atol=1e-3) for k, t in two.items() if k.endswith("weight"))
    for key, t in two.items():  # buffers (BN statistics, batch counts) included
        np.testing.assert_allclose(one[key].numpy(), t.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:]


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _kill_a_rank_after_the_first_checkpoint(cmd: list[str], out: Path) -> None:
    """Start `cmd` (torchrun), SIGKILL one rank once the first checkpoint is on disk: the job fails."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "state.pt").exists(), "the job wrote no checkpoint"
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "failed" in err.lower()
    assert not (out / "DONE").exists()


def _resumed_with_the_same_command(cmd: list[str], out: Path) -> None:
    """Run `cmd` again and check it continued from the checkpoint instead of starting over: the metrics
    rows up to the checkpoint are kept byte for byte (their timings included, which a new run would
    measure again), and the rows after it are produced once."""
    kept_until = int(load_state(out / "state.pt")["step"])
    steps = _columns(out / "metrics.csv")["step"]
    before = [r for r, step in zip(_rows(out / "metrics.csv"), steps, strict=True) if int(step) <= kept_until]
    assert before, "no metrics row was checkpointed"
    _ok(cmd)
    assert (out / "DONE").exists()
    assert _rows(out / "metrics.csv")[: len(before)] == before


def _columns(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    names = lines[0].split(",")
    return {n: [line.split(",")[i] for line in lines[1:]] for i, n in enumerate(names)}


@pytest.mark.slow
def test_a_dead_rank_stops_pretraining_and_the_same_torchrun_command_continues_it(
    setup: tuple[Path, Path, Path], two_ranks: Path
) -> None:
    tmp, config, _ = setup
    out = tmp / "pre-killed"
    cmd = _pretrain_command(config, out)
    _kill_a_rank_after_the_first_checkpoint(cmd, out)
    _resumed_with_the_same_command(cmd, out)
    # And it ends where the uninterrupted run ends: every tensor, every metric but the timings.
    a, _ = load_weights(two_ranks / "backbone.safetensors")
    b, _ = load_weights(out / "backbone.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ref, got = _columns(two_ranks / "metrics.csv"), _columns(out / "metrics.csv")
    timings = {"images_per_s", "epoch_s", "val_s"}
    assert ref.keys() == got.keys()
    for name in ref.keys() - timings:
        assert ref[name] == got[name], name


@pytest.mark.slow
def test_a_dead_rank_stops_meta_training_and_the_same_torchrun_command_continues_it(
    setup: tuple[Path, Path, Path],
) -> None:
    tmp, config, pre = setup
    out = tmp / "meta-killed"
    args = ("meta-train", "--config", str(config), "--pretrained", str(pre), "--out", str(out), *FP32)
    cmd = _torchrun(*args, "--set", "meta.tasks=48", "--set", "meta.val_every=8")
    _kill_a_rank_after_the_first_checkpoint(cmd, out)
    _resumed_with_the_same_command(cmd, out)
    steps = [int(s) for s in _columns(out / "metrics.csv")["step"]]
    assert steps == list(range(0, 49, 8))  # each checkpoint's row once: none lost, none repeated

"""The run lifecycle of both phases, and fp16 training with loss scaling.

A phase that raises midway releases its run lock and leaves a run that the same call resumes, ending
bit-identical to an uninterrupted run. Both phases run at fp16 here (on the CPU), with a loss scale so
large that the first step overflows and is skipped: the scale at a checkpoint then differs from the
initial one, and only a resume that restores it repeats the uninterrupted run.
"""

from __future__ import annotations

import csv
import fcntl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from metatransfer.config import Config, load_config
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.runs import LOCK_FILE, load_state
from metatransfer.train.loop import ScaledOptimizer
from metatransfer.train.meta import MetaTrainer, meta_train
from metatransfer.train.pretrain import Pretrainer, pretrain

from tiny import write_config, write_pattern_folder

# fp16 overflows at 65504, so the first step's scaled gradients are inf for certain; its skip then
# divides the scale by 2**20, to about where the default of 2**16 would be.
INIT_SCALE, BACKOFF = 2.0**40, 2.0**-20
TIMING = ("images_per_s", "epoch_s", "val_s", "tasks_per_s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config]:
    """(folder, fp16 config) of a 3-epoch pre-training and a 12-task meta-training on the tiny dataset;
    the folder holds an fp32 pre-training run in `pre` for meta-training to start from."""
    tmp = tmp_path_factory.mktemp("training-run")
    data = write_pattern_folder(tmp / "data")
    path = write_config(tmp / "cfg.yaml", data, tmp / "cache", pretrain={"epochs": 3}, meta={"tasks": 12})
    pretrain(load_config(path, ["precision=fp32"]), tmp / "pre")
    return tmp, load_config(path, ["precision=fp16"])


@pytest.fixture
def large_init_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    def grad_scaler(self: Runtime) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(
            self.device.type,
            init_scale=INIT_SCALE,
            backoff_factor=BACKOFF,
            enabled=self.amp_dtype == torch.float16,
        )

    monkeypatch.setattr(Runtime, "grad_scaler", grad_scaler)


PHASES: dict[str, tuple[type, str, int, list[str]]] = {
    # phase: (class, method that fails, failing call (the first after the first checkpoint), weight files)
    "pretrain": (Pretrainer, "step", 6 + 3, ["backbone.safetensors"]),
    "meta-train": (MetaTrainer, "learn", 2 + 1, ["model.safetensors", "last.safetensors"]),
}


def _run(phase: str, tiny: tuple[Path, Config], out: Path) -> None:
    tmp, cfg = tiny
    if phase == "pretrain":
        pretrain(cfg, out)
    else:
        meta_train(cfg, tmp / "pre", out)


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, fail_at: int | None) -> list[int]:
    """Wrap `owner.name` to count its calls (into the returned list) and raise on call `fail_at`."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(owner, name)

    def wrapped(self: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def _lock_is_free(run_dir: Path) -> bool:
    with (run_dir / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.usefixtures("large_init_scale")
@pytest.mark.parametrize("phase", list(PHASES))
def test_an_exception_releases_the_lock_and_the_fp16_run_resumes_exactly(
    tiny: tuple[Path, Config], phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, method, fail_at, weights = PHASES[phase]
    tmp = tiny[0]
    reference, out = tmp / f"{phase}-reference", tmp / f"{phase}-failed"
    with monkeypatch.context() as patch:
        full = _count_calls(patch, owner, method, fail_at=None)
        _run(phase, tiny, reference)
    with monkeypatch.context() as patch:
        _count_calls(patch, owner, method, fail_at=fail_at)
        with pytest.raises(RuntimeError, match="injected failure") as failure:
            _run(phase, tiny, out)
    # `failure` keeps the traceback, and so the phase's frames, alive: only an explicit close frees the lock.
    assert _lock_is_free(out), failure.value
    state = load_state(out / "state.pt")
    assert state["scaler"]["scale"] <= INIT_SCALE * BACKOFF  # the first step was skipped
    assert not (out / "DONE").exists()

    with monkeypatch.context() as patch:
        resumed = _count_calls(patch, owner, method, fail_at=None)
        _run(phase, tiny, out)
    assert 0 < len(resumed) < len(full)  # it went on from the checkpoint, not from the start
    for name in weights:
        expected, got = load_file(reference / name), load_file(out / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    rows = _rows(reference)
    assert _rows(out) == rows
    # fp16 trains: steps with inf gradients were skipped, the others applied.
    assert 0 < sum(int(r["skipped_steps"] or 0) for r in rows) < len(full)
    if phase == "pretrain":  # and the loss fell (meta-training's query loss is too noisy for 6 steps)
        losses = [float(r["train_loss"]) for r in rows]
        assert losses[-1] < losses[0]


def test_scaled_optimizer_skips_steps_with_inf_gradients_and_restores_its_scale() -> None:
    runtime = resolve_runtime(load_config(None, ["device=cpu", "precision=fp16"]))
    param = torch.nn.Parameter(torch.ones(3))
    update = ScaledOptimizer(torch.optim.SGD([param], lr=0.1), runtime)
    scale = update.scaler.get_scale()
    update.backward((param * torch.tensor([1.0, float("inf"), 1.0])).sum())
    update.step()
    assert torch.equal(param.detach(), torch.ones(3))  # skipped: the weights are untouched
    assert update.scaler.get_scale() == scale / 2 and update.take_skipped() == 1
    param.grad = None
    update.backward(param.sum())
    update.step()
    assert torch.allclose(param.detach(), torch.full((3,), 0.9))  # unscaled: lr * 1, not lr * scale
    assert update.take_skipped() == 0

    again = ScaledOptimizer(torch.optim.SGD([param], lr=0.1), runtime)
    again.load_state_dict(update.state_dict())
    assert again.scaler.get_scale() == scale / 2


def test_scaled_optimizer_is_a_plain_step_at_fp32() -> None:
    runtime = resolve_runtime(load_config(None, ["device=cpu", "precision=fp32"]))
    param = torch.nn.Parameter(torch.ones(2))
    update = ScaledOptimizer(torch.optim.SGD([param], lr=0.5), runtime)
    update.backward(param.sum())
    update.step()
    assert torch.equal(param.detach(), torch.full((2,), 0.5)) and update.state_dict()["scaler"] == {}

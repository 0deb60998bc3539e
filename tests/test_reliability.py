"""Training-time failures end with one clear line and leave the last good checkpoint in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metatransfer.cli import main
from metatransfer.runs import load_state

from tiny import write_config, write_pattern_folder


def _poison_step(monkeypatch: pytest.MonkeyPatch, optimizer: type[torch.optim.Optimizer], call: int) -> None:
    """Make `optimizer`'s `call`-th step write NaN into every weight it updates: a diverged update
    (its loss was finite). Pre-training steps with SGD, meta-training (theta and SS) with Adam.

    The learning-rate ranges of the config refuse values that would do this by themselves, so the
    divergence is injected. The tiny dataset has 96 train images in batches of 16: 6 steps per epoch.
    """
    real = optimizer.step
    calls = 0

    def step(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        nonlocal calls
        result = real(self, *args, **kwargs)
        calls += 1
        if calls == call:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return result

    monkeypatch.setattr(optimizer, "step", step)


@pytest.mark.parametrize(
    "poisoned_step,message",
    [
        (7, "loss became nan at epoch 2 step 2"),  # the next step's loss is NaN
        (12, "holds NaN or infinite values"),  # the epoch's last step: caught before the checkpoint
    ],
)
def test_a_diverged_update_stops_training_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    poisoned_step: int,
    message: str,
) -> None:
    data = write_pattern_folder(tmp_path / "data")
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "cache", pretrain={"epochs": 3})
    out = tmp_path / "run"
    _poison_step(monkeypatch, torch.optim.SGD, poisoned_step)
    assert main(["pretrain", "--config", str(config), "--out", str(out), "--set", "precision=fp32"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars come before it
    assert last.startswith("mtl: error:") and message in last, last
    state = load_state(out / "state.pt")
    assert state["epoch"] == 0  # the checkpoint of epoch 1 survives
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert (out / "backbone.safetensors").exists()
    assert not (out / "DONE").exists()
    monkeypatch.undo()  # the same command then resumes from it and finishes
    assert main(["pretrain", "--config", str(config), "--out", str(out), "--set", "precision=fp32"]) == 0


def _saved_floats(folder: Path) -> dict[str, torch.Tensor]:
    """Every floating-point tensor saved in `folder`: all model files and the resume state."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({f"{path.name}:{k}": t for k, t in load_file(path).items()})

    def walk(value: object, key: str) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list | tuple):
            for k, v in enumerate(value):
                walk(v, f"{key}.{k}")

    walk(load_state(folder / "state.pt"), "state.pt")
    return {k: t for k, t in found.items() if t.is_floating_point()}


@pytest.mark.parametrize(
    "poisoned_step,message",
    [
        # 12 tasks in meta-batches of 2, validated and checkpointed every 4 tasks (after Adam steps 2, 4, 6).
        (3, "loss became nan at meta-training task 7"),  # the next meta-batch's loss is NaN
        (4, "holds NaN or infinite values"),  # the step before a checkpoint: the save refuses it
    ],
)
def test_a_diverged_meta_training_update_stops_and_saves_nothing_non_finite(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    poisoned_step: int,
    message: str,
) -> None:
    data = write_pattern_folder(tmp_path / "data")
    config = write_config(
        tmp_path / "cfg.yaml",
        data,
        tmp_path / "cache",
        pretrain={"epochs": 1, "val_episodes": 5},
        meta={"tasks": 12, "val_every": 4, "val_episodes": 5},
    )
    fp32 = ["--set", "precision=fp32"]  # no loss scaler: Adam.step is called directly
    pre, out = tmp_path / "pre", tmp_path / "meta"
    assert main(["pretrain", "--config", str(config), "--out", str(pre), *fp32]) == 0
    cmd = ["meta-train", "--config", str(config), "--pretrained", str(pre), "--out", str(out), *fp32]
    _poison_step(monkeypatch, torch.optim.Adam, poisoned_step)
    assert main(cmd) == 2
    saved = _saved_floats(out)
    assert any(k.startswith("model.safetensors:") for k in saved)  # the kept start, saved at task 0
    assert any(k.startswith("state.pt.model.") for k in saved)
    bad = [k for k, t in saved.items() if not torch.isfinite(t).all()]
    assert not bad, bad
    assert load_state(out / "state.pt")["step"] == 4  # the checkpoint at task 4 survives
    assert not (out / "last.safetensors").exists() and not (out / "DONE").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars come before it
    assert last.startswith("mtl: error:") and message in last, last
    monkeypatch.undo()  # the same command then resumes from it and finishes
    assert main(cmd) == 0
    assert (out / "DONE").exists()


def test_bad_training_image_fails_or_is_skipped_by_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_pattern_folder(tmp_path / "data")
    bad = data / "train" / "train-class00" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "cache", pretrain={"epochs": 1})
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "on_bad_image" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="broken.png"):
        code = main(
            [
                "pretrain",
                "--config",
                str(config),
                "--out",
                str(out),
                "--set",
                "data.on_bad_image=skip",
                "--overwrite",
            ]
        )
    assert code == 0
    assert bad.read_bytes().startswith(b"\x89PNG")  # the source is left as it was

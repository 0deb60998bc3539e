"""Training-time failures end with one clear line and leave the last good checkpoint in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metatransfer.cli import main
from metatransfer.runs import load_state

from tiny import write_config, write_pattern_folder


def _poison_sgd_step(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make SGD's `call`-th step write NaN into every weight: a diverged update (its loss was finite).

    The learning-rate ranges of the config refuse values that would do this by themselves, so the
    divergence is injected. The tiny dataset has 96 train images in batches of 16: 6 steps per epoch.
    """
    real = torch.optim.SGD.step
    calls = 0

    def step(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        nonlocal calls
        result = real(self, *args, **kwargs)
        calls += 1
        if calls == call:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)


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
    _poison_sgd_step(monkeypatch, poisoned_step)
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

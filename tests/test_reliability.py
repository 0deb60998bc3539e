"""Training-time failures end with one clear line and leave the last good checkpoint in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metatransfer.cli import main
from metatransfer.runs import load_state

from tiny import write_config, write_pattern_folder


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_pattern_folder(tmp_path / "data")
    # Epoch 1 trains normally; the step schedule then multiplies the learning rate by 1e30.
    config = write_config(
        tmp_path / "cfg.yaml",
        data,
        tmp_path / "cache",
        pretrain={"epochs": 3, "schedule": "step", "step_size": 1, "gamma": 1e30, "weight_decay": 0.0},
    )
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out), "--set", "precision=fp32"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars come before it
    assert last.startswith("mtl: error: loss became") and "epoch 2 step" in last, last
    state = load_state(out / "state.pt")
    assert state["epoch"] == 0  # the checkpoint of epoch 1 survives
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert (out / "backbone.safetensors").exists()
    assert not (out / "DONE").exists()


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

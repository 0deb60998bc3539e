"""Curves, `mtl report`, the metrics hook (curves.png, TensorBoard) and `mtl --version`, on run folders
written here as training writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from metatransfer import __version__, monitor
from metatransfer.cli import main
from metatransfer.config import Config, to_yaml
from metatransfer.report import build_report, render_markdown
from metatransfer.runs import MetricsLog, claim_folder, remove_our_files, save_weights, write_json


def _config(path: Path, **meta: object) -> None:
    cfg = Config(name="synthetic")
    cfg.model.backbone, cfg.model.backbone_args = "conv4", {"hidden": 8}
    cfg.pretrain.epochs = 3
    for k, v in meta.items():
        setattr(cfg.meta, k, v)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))


def write_pretrain(path: Path) -> None:
    """3 epochs; epoch 2 has the best mean val accuracy and is the kept backbone."""
    _config(path)
    log = MetricsLog(path / "metrics.csv")
    for epoch, (loss, one, five) in enumerate([(2.0, 0.40, 0.55), (1.5, 0.50, 0.66), (1.2, 0.49, 0.65)], 1):
        log.append(
            {
                "epoch": epoch,
                "step": epoch,
                "lr": 0.1,
                "train_loss": loss,
                "train_acc": 0.3 * epoch,
                "images_per_s": 100.0 * epoch,
                "epoch_s": 10.0,
                "val_1shot": one,
                "val_1shot_ci": 0.02,
                "val_5shot": five,
                "val_5shot_ci": 0.01,
                "val_s": 2.0,
            }
        )
    save_weights(path / "backbone.safetensors", {"w": torch.zeros(1)}, {"epoch": "2"})
    (path / "DONE").write_text("{}")


def write_meta(path: Path, shot: int) -> None:
    """8 tasks with hard tasks; task 4 is the best validation and the kept model; one test result."""
    _config(path, shot=shot, tasks=8, ht={"enabled": True, "tasks_per_batch": 1, "start_after": 0})
    log = MetricsLog(path / "metrics.csv")
    log.append({"step": 0, "tasks": 0, "hard_tasks": 0, "val_acc": 0.50, "val_ci": 0.03})
    for tasks, hard, loss, val in [(4, 2, 0.9, 0.56), (8, 4, 0.8, 0.55)]:
        log.append(
            {
                "step": tasks,
                "tasks": tasks,
                "hard_tasks": hard,
                "train_loss": loss,
                "train_query_acc": 0.7,
                "val_acc": val,
                "val_ci": 0.03,
                "tasks_per_s": 2.5,
                "val_s": 1.0,
            }
        )
    save_weights(path / "model.safetensors", {"w": torch.zeros(1)}, {"tasks": "4"})
    write_json(path / "summary.json", {"best_val": 0.56, "tasks": 8, "hard_tasks": 4, "seconds": 12.5})
    key = f"test/5-way/{shot}-shot/600-episodes/seed-0"
    entry = {"split": "test", "way": 5, "shot": shot, "query": 15, "episodes": 600, "seed": 0}
    write_json(path / "results.json", {key: {**entry, "accuracy": 0.612, "ci95": 0.008, "seconds": 3.0}})
    (path / "DONE").write_text("{}")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    write_pretrain(root / "pretrain")
    write_meta(root / "meta-5shot", 5)
    write_meta(root / "meta-1shot", 1)
    return root


def test_report_content(run_dir: Path) -> None:
    report = build_report(run_dir)
    assert [p["dir"] for p in report["phases"]] == ["pretrain", "meta-1shot", "meta-5shot"]
    pre, meta = report["phases"][0], report["phases"][1]
    assert pre["best_val"] == {
        "epoch": 2,
        "1shot": {"accuracy": 0.5, "ci95": 0.02},
        "5shot": {"accuracy": 0.66, "ci95": 0.01},
    }
    assert pre["kept"] == {"file": "backbone.safetensors", "epoch": 2}
    assert pre["time_s"] == pytest.approx(36.0) and pre["images_per_s"] == pytest.approx(200.0)
    assert meta["best_val"] == {"tasks": 4, "accuracy": 0.56, "ci95": 0.03}
    assert meta["start_val"] == {"accuracy": 0.5, "ci95": 0.03}
    assert meta["kept"] == {"file": "model.safetensors", "tasks": 4}
    assert (meta["tasks_done"], meta["hard_tasks_done"], meta["tasks_per_s"]) == (8, 4, 2.5)
    assert [(r["model"], r["shot"], r["accuracy"], r["ci95"]) for r in report["results"]] == [
        ("meta-1shot", 1, 0.612, 0.008),
        ("meta-5shot", 5, 0.612, 0.008),
    ]
    assert report["time_s"] == pytest.approx(36.0 + 2 * 12.5 + 2 * 3.0)
    assert report["config"]["backbone"] == "conv4" and report["config"]["meta"]["hard_tasks"] is False
    text = render_markdown(report)
    assert "![training curves](curves.png)" in text
    assert "| meta-1shot | test | 5 | 1 | 15 | 600 (0) | 61.20 | ± 0.80 |" in text
    assert "5-way 1-shot 50.00 ± 2.00 %, 5-shot 66.00 ± 1.00 % (epoch 2)" in text
    assert "8/8 tasks (+4 hard)" in text and "meta-1shot/model.safetensors (task 4)" in text


def test_cli_report_json_and_figure(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(build_report(run_dir)))
    with Image.open(run_dir / "curves.png") as whole:
        whole_size = whole.size
    # One phase alone: its own figure, one row of panels instead of three.
    assert main(["report", str(run_dir / "meta-1shot")]) == 0
    assert capsys.readouterr().out.startswith("# Run report: synthetic")
    with Image.open(run_dir / "meta-1shot" / "curves.png") as one:
        assert one.size[0] == whole_size[0] and 2.5 * one.size[1] < whole_size[1]


def test_report_of_a_folder_without_runs_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error: ") and "metrics.csv" in err and "\n" not in err


def test_runlog_redraws_curves_and_writes_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    claim_folder(tmp_path)
    _config(tmp_path)
    log = monitor.RunLog(tmp_path, tensorboard=True)
    log.append({"step": 0, "tasks": 0, "hard_tasks": 0, "val_acc": 0.5, "val_ci": 0.03})
    first = (tmp_path / "curves.png").read_bytes()
    log.append({"step": 4, "tasks": 4, "hard_tasks": 1, "train_loss": 0.9, "val_acc": 0.6, "val_ci": 0.02})
    log.close()
    assert (tmp_path / "curves.png").read_bytes() != first  # redrawn with the new row
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"hard_tasks", "val_acc", "val_ci", "train_loss"}
    assert [(e.step, e.value) for e in events.Scalars("val_acc")] == [(0, 0.5), (4, pytest.approx(0.6))]
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(4, pytest.approx(0.9))]
    # The event file is one of the run's files: --overwrite removes it with metrics.csv and curves.png.
    remove_our_files(tmp_path)
    assert not list(tmp_path.glob("events.out.tfevents.*")) and not (tmp_path / "curves.png").exists()


def test_tensorboard_missing_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(monitor, "tensorboard_installed", lambda: False)
    out = tmp_path / "out"
    for flags in (["--tensorboard"], ["--set", "logging.tensorboard=true"]):
        assert main(["pretrain", "--out", str(out), "--config", str(_default_config(tmp_path)), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"mtl: error: {monitor.TENSORBOARD_HINT}"
        assert not out.exists()  # refused before any work


def _default_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"metatransfer {__version__}"
    assert f"torch {torch.__version__}" in lines
    assert lines[-1].startswith("device: cuda" if torch.cuda.is_available() else "device: cpu")

"""End to end: pre-train, meta-train and meta-test through the CLI on a small image folder."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from metatransfer.cli import main

from tiny import write_config, write_pattern_folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_pattern_folder(tmp / "data")
    config = write_config(tmp / "tiny.yaml", data, tmp / "cache")
    out = tmp / "run"
    log = io.StringIO()  # not a terminal: progress comes as plain lines, kept for test_log_is_plain_lines
    with redirect_stdout(log), redirect_stderr(log):
        code = main(["run", "--config", str(config), "--out", str(out)])
    (tmp / "log.txt").write_text(log.getvalue())
    assert code == 0, log.getvalue()[-2000:]
    return out, config


def test_run_writes_every_phase(tiny_run: tuple[Path, Path]) -> None:
    out, _ = tiny_run
    for name in (
        "pretrain/backbone.safetensors",
        "pretrain/metrics.csv",
        "pretrain/config.yaml",
        "pretrain/DONE",
    ):
        assert (out / name).exists(), name
    meta = out / "meta-1shot"
    assert (meta / "model.safetensors").exists()
    results = json.loads((meta / "results.json").read_text())
    entry = results["test/3-way/1-shot/30-episodes/seed-0"]
    assert entry["episodes"] == 30
    per_episode = np.loadtxt(meta / "episodes-test-3way-1shot.csv", delimiter=",", skiprows=1)
    assert per_episode.shape == (30, 2)
    assert entry["accuracy"] == pytest.approx(per_episode[:, 1].mean())
    # Three classes of distinct patterns: well above the 1/3 of chance.
    assert entry["accuracy"] > 0.6
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["accuracy"] == pytest.approx(entry["accuracy"])


def test_summary_sets_each_result_beside_ncm_paired(tiny_run: tuple[Path, Path]) -> None:
    # The summary's reference must be NCM on the very episodes meta-test scored: recompute it with
    # `mtl ablate --methods ncm` on the same backbone and pair it by hand.
    out, config = tiny_run
    abl = out.parent / "ablate-ncm"
    log = io.StringIO()
    with redirect_stdout(log), redirect_stderr(log):
        code = main(
            ["ablate", "--config", str(config), "--pretrained", str(out / "pretrain"), "--out", str(abl)]
            + ["--methods", "ncm", "--shots", "1"]
        )
    assert code == 0, log.getvalue()[-2000:]
    with (abl / "ablation-episodes.csv").open() as f:
        ncm = np.array([float(r["accuracy"]) for r in csv.DictReader(f)])
    meta = np.loadtxt(out / "meta-1shot" / "episodes-test-3way-1shot.csv", delimiter=",", skiprows=1)[:, 1]
    assert len(ncm) == len(meta) == 30
    d = meta - ncm
    mean, half = d.mean(), 1.96 * math.sqrt(((d - d.mean()) ** 2).sum() / len(d)) / math.sqrt(len(d))
    (entry,) = json.loads((out / "summary.json").read_text())
    assert entry["ncm_accuracy"] == pytest.approx(ncm.mean(), abs=1e-6)
    assert entry["delta_vs_ncm"] == pytest.approx(mean, abs=1e-6)
    assert entry["delta_vs_ncm_ci95"] == pytest.approx(half, abs=1e-6)
    row = (out / "summary.md").read_text().splitlines()[2]
    assert row.endswith(f"| {100 * ncm.mean():.2f} | {100 * mean:+.2f} ± {100 * half:.2f} |"), row


def test_log_is_plain_lines(tiny_run: tuple[Path, Path]) -> None:
    out, _ = tiny_run
    log = (out.parent / "log.txt").read_text()
    assert "\r" not in log  # no bar redraws: one line per event
    lines = log.splitlines()
    for epoch in (1, 2, 3):
        assert sum(line.startswith(f"epoch {epoch}/3: loss ") for line in lines) == 1
    assert sum(line.startswith("before meta-training: val ") for line in lines) == 1
    assert [line.split(" ")[1] for line in lines if line.startswith("tasks ")] == ["4/8", "8/8"]
    assert lines[-1] == f"report: {out / 'report.md'}"
    assert len(lines) < 30, log


def test_run_draws_curves_and_writes_the_report(tiny_run: tuple[Path, Path]) -> None:
    out, _ = tiny_run
    for folder in (out, out / "pretrain", out / "meta-1shot"):
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", folder
    report = (out / "report.md").read_text()
    assert "![training curves](curves.png)" in report
    entry = json.loads((out / "meta-1shot" / "results.json").read_text())[
        "test/3-way/1-shot/30-episodes/seed-0"
    ]
    assert (
        f"| meta-1shot | test | 3 | 1 | 4 | 30 (0) | {100 * entry['accuracy']:.2f} | ± {100 * entry['ci95']:.2f} |"
        in report
    )
    rows = (out / "pretrain" / "metrics.csv").read_text().splitlines()[1:]
    assert "3/3 epochs" in report and len(rows) == 3


def test_pretraining_loss_falls(tiny_run: tuple[Path, Path]) -> None:
    out, _ = tiny_run
    rows = (out / "pretrain" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("train_loss")]) for r in rows[1:]]
    assert len(losses) == 3
    assert losses[-1] < losses[0]


def test_meta_test_is_deterministic_and_prints_the_line(
    tiny_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = tiny_run
    lines = []
    for _ in range(2):
        assert (
            main(["meta-test", str(out / "meta-1shot"), "--way", "3", "--query", "4", "--episodes", "25"])
            == 0
        )
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[0] == lines[1]
    assert lines[0].startswith("accuracy: ")
    # The line names the reported episodes' seed and the other seed that chose the model.
    assert lines[0].endswith(
        "% (95% CI, 25 episodes, 3-way 1-shot, test split); "
        "episodes of seed 0, model chosen on val episodes of seed 1"
    )


def test_finished_run_is_not_overwritten(
    tiny_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, config = tiny_run
    assert main(["pretrain", "--config", str(config), "--out", str(out / "pretrain")]) == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err
    assert "Traceback" not in err


def test_run_keeps_the_backbone_when_only_the_meta_section_changed(tiny_run: tuple[Path, Path]) -> None:
    # Tuning phase 2 must not cost a new pre-training: `mtl run` with a new meta section into a folder
    # holding that config's finished pretrain reuses it and meta-trains afresh.
    out, config = tiny_run
    again = out.parent / "run-new-meta"
    shutil.copytree(out / "pretrain", again / "pretrain")
    backbone = (again / "pretrain" / "backbone.safetensors").read_bytes()
    log = io.StringIO()
    with redirect_stdout(log), redirect_stderr(log):
        code = main(["run", "--config", str(config), "--out", str(again), "--set", "meta.inner_lr=0.05"])
    assert code == 0, log.getvalue()[-2000:]
    header = r"pre-training \w+ \("  # what pre-training prints when it starts
    assert re.search(header, (out.parent / "log.txt").read_text())
    assert not re.search(header, log.getvalue())
    assert f"pre-training: reusing the finished run in {again / 'pretrain'}" in log.getvalue()
    assert (again / "pretrain" / "backbone.safetensors").read_bytes() == backbone
    assert "inner_lr: 0.05" in (again / "meta-1shot" / "config.yaml").read_text()
    assert (again / "summary.json").exists()


def test_unknown_config_key_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("meta:\n  wya: 5\n")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "meta.wya" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["pretrain", "run"])
def test_overwrite_inside_the_dataset_or_a_foreign_folder_is_refused_and_deletes_nothing(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_pattern_folder(tmp_path / "data", per_class=2)
    config = write_config(tmp_path / "tiny.yaml", data, tmp_path / "cache")
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    for out, problem in (
        (data / "train" / "train-class00", "inside the dataset"),
        (foreign, "did not write"),
    ):
        assert main([command, "--config", str(config), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and len(err.splitlines()) == 1
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert after == before

"""Model cards: written by `mtl export`, shown by `mtl info` and `load(...).card`; old files still load."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from metatransfer import __version__, load
from metatransfer.card import CARD_KEY
from metatransfer.cli import main
from metatransfer.predict import export_model
from metatransfer.runs import load_weights, save_weights, write_json
from test_predict import make_run

RESULT = {"split": "test", "way": 5, "shot": 1, "query": 15, "episodes": 600, "seed": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_run(tmp_path_factory.mktemp("card") / "meta-1shot", channels=1)
    results = {"test/5-way/1-shot/600-episodes/seed-0": {**RESULT, "accuracy": 0.6123, "ci95": 0.0081}}
    write_json(path / "results.json", results)
    return path


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(run, tmp_path_factory.mktemp("export") / "model.mtl")


def test_export_writes_the_card(exported: Path) -> None:
    _, info = load_weights(exported)
    card = json.loads(info[CARD_KEY])
    assert card["dataset"]["name"] == "glyphs"
    assert card["dataset"]["splits"] == {"train": "train", "selection": "val", "tested": ["test"]}
    assert (card["image_size"], card["channels"]) == (28, 1)
    assert card["backbone"] == {"name": "conv4", "args": {"hidden": 8}}
    assert (card["method"], card["way"], card["kept_at_task"]) == ("mtl", 5, 100)
    (result,) = card["results"]
    assert result["accuracy"] == 0.6123 and result["ci95"] == 0.0081 and result["episodes"] == 600
    assert "5-way 1-shot, 15 queries per class, 600 episodes (seed 0) of the test split" in result["protocol"]
    assert "50 steps" in result["protocol"]  # the run's inner_steps_test
    config = card["training_config"]
    assert config["meta"]["inner_steps_test"] == 50 and config["precision"] == "fp32"
    assert "root" not in config["data"] and "cache_dir" not in config["data"]  # local paths stay local
    assert card["metatransfer_version"] == __version__
    created = dt.datetime.fromisoformat(card["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600


def test_load_exposes_the_card(run: Path, exported: Path) -> None:
    from_file, from_run = load(exported).card, load(run).card
    assert from_file is not None and from_run is not None
    assert from_file["results"] == from_run["results"]
    assert from_file["training_config"] == from_run["training_config"]


def test_cli_info_text_and_json(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(exported)]) == 0
    text = capsys.readouterr().out
    assert f"model: {exported} (exported model, format 1)" in text
    assert "data: glyphs; images 28 px, 1 channel(s)" in text
    assert "backbone: conv4 (hidden=8)" in text
    assert "method: mtl, meta-trained 5-way 1-shot, kept at task 100" in text
    assert "61.23 ± 0.81 %: 5-way 1-shot, 15 queries per class, 600 episodes" in text
    assert main(["info", str(exported), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["kind"] == "export" and desc["card"]["results"][0]["accuracy"] == 0.6123


def test_old_file_without_card_still_loads(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors, info = load_weights(exported)
    del info[CARD_KEY]
    old = tmp_path / "old.mtl"
    save_weights(old, tensors, info)
    learner = load(old)
    assert learner.card is None
    assert learner.model.theta_weight.shape[0] == 5
    assert main(["info", str(old)]) == 0
    out = capsys.readouterr().out
    assert "backbone: conv4" in out and "no model card" in out


def test_info_refuses_what_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("mtl: error: no model at ")

"""The shipped-model mechanism on a model trained here: benchmarks/ship_model.py registers a finished
tiny `mtl run`, then names resolve (and only to verified files), `mtl models` / `info` / `predict`
take them, and paths work as before. The registry folder is a temporary one: nothing is shipped."""

from __future__ import annotations

import json
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

import metatransfer
from metatransfer import pretrained
from metatransfer.cli import main
from metatransfer.errors import ChecksumError, ModelFileError, UnknownModelError
from metatransfer.runs import load_weights
from shipped import meta_test_shipped

from tiny import write_config, write_pattern_folder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import ship_model  # noqa: E402

COMMAND = "mtl run --config tiny.yaml --out run"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(registry folder, the run's meta folder, the data) after shipping tiny-1shot (fp32) and
    tiny-1shot-half (fp16) from one tiny mtl run in fp32."""
    tmp = tmp_path_factory.mktemp("ship")
    data = write_pattern_folder(tmp / "data")
    config = write_config(tmp / "tiny.yaml", data, tmp / "cache")
    cfg = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**cfg, "precision": "fp32"}))  # agreement must then be exact
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTL_CACHE_DIR", str(tmp / "cache"))
        assert main(["--quiet", "run", "--config", str(config), "--out", str(tmp / "run")]) == 0
        folder = tmp / "pretrained"
        folder.mkdir()
        run = tmp / "run" / "meta-1shot"
        ship_model.ship(run, "tiny-1shot", COMMAND, episodes=1, folder=folder, machine_text="test box")
        ship_model.ship(run, "tiny-1shot-half", COMMAND, fp16=True, episodes=1, folder=folder)
    return folder, run, data


@pytest.fixture(autouse=True)
def registry_folder(
    shipped: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Path:
    monkeypatch.setattr(pretrained, "FOLDER", shipped[0])
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    return shipped[0]


def test_ship_records_the_run(shipped: tuple[Path, Path, Path]) -> None:
    folder, run, _ = shipped
    models = pretrained.registry()
    assert sorted(models) == ["tiny-1shot", "tiny-1shot-half"]
    full, half = models["tiny-1shot"], models["tiny-1shot-half"]
    row = json.loads((run.parent / "summary.json").read_text())[0]
    for m in (full, half):
        assert (
            m.sha256 == pretrained.sha256(folder / m.file)
            and m.size_bytes == (folder / m.file).stat().st_size
        )
        assert (m.dataset, m.image_size, m.channels, m.way, m.shot) == ("image-folder", 28, 3, 3, 1)
        assert m.result.accuracy == row["accuracy"] and m.result.delta_vs_ncm == row["delta_vs_ncm"]
        assert (m.result.split, m.result.episodes, m.result.seed) == ("test", 30, 0)
        assert m.command == COMMAND
        # 1 episode x 3 classes x 4 queries, through `mtl predict` as a separate process.
        assert (m.agreement.queries, m.agreement.episodes, m.agreement.precision) == (12, 1, "fp32")
    assert full.agreement.agree == 12  # fp32 everywhere: folding SS changes no prediction
    assert full.machine == "test box" and "cores" in half.machine
    assert (full.storage, half.storage) == ("fp32", "fp16")
    (full_tensors, _), (half_tensors, info) = (load_weights(folder / m.file) for m in (full, half))
    assert info["storage"] == "fp16"
    for key, t in full_tensors.items():  # every fp32 tensor stored in half the bytes, the rest as they were
        assert half_tensors[key].dtype == (torch.float16 if t.dtype == torch.float32 else t.dtype), key


def test_ship_refuses_a_second_model_of_the_same_name(shipped: tuple[Path, Path, Path]) -> None:
    folder, run, _ = shipped
    with pytest.raises(metatransfer.UserError, match="already shipped; pass --overwrite"):
        ship_model.ship(run, "tiny-1shot", COMMAND, folder=folder)
    with pytest.raises(metatransfer.UserError, match="lowercase letters"):
        ship_model.ship(run, "Tiny_1shot", COMMAND, folder=folder)


@pytest.mark.parametrize("name", ["tiny-1shot", "tiny-1shot-half"])
def test_loaded_by_name_it_meets_its_card(name: str, shipped: tuple[Path, Path, Path]) -> None:
    # The same check the real shipped models pass on shared data, here on the card's own 30 episodes.
    model, mean, ci = meta_test_shipped(name, shipped[2], 30)
    assert abs(model.result.accuracy - mean) <= ci
    learner = metatransfer.load(name)
    assert learner.source == name and name in repr(learner)


def test_cli_models_info_and_predict_by_name(
    shipped: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = shipped[2]
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "dataset", "size"]
    acc = 100 * pretrained.registry()["tiny-1shot"].result.accuracy
    assert any(
        line.startswith("tiny-1shot ") and f"{acc:.2f} ±" in line and "28 px" in line for line in lines
    )
    assert main(["info", "tiny-1shot"]) == 0
    out = capsys.readouterr().out
    assert "shipped as tiny-1shot" in out and COMMAND in out and "agrees with meta-test on 12 of 12" in out
    assert main(["info", "tiny-1shot", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shipped"]["name"] == "tiny-1shot"
    support = data / "test"
    query = next((data / "test").glob("*/000.png"))
    assert main(["predict", "tiny-1shot", "--support", str(support), "--query", str(query), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class"] == query.parent.name


def test_unknown_name_lists_the_shipped_ones(
    shipped: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shipped[2] / "test"
    with pytest.raises(UnknownModelError) as info:
        metatransfer.load("omniglot-9shot")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'omniglot-9shot'" in message and "tiny-1shot, tiny-1shot-half" in message and "\n" not in message
    for command in (
        ["predict", "omniglot-9shot", "--support", str(data), "--query", str(data)],
        ["info", "x"],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mtl: error:") and "shipped models: tiny-1shot" in err and "\n" not in err
    # A missing path is still reported as a path, not as an unknown name.
    with pytest.raises(metatransfer.UserError) as missing:
        metatransfer.load(str(tmp_path / "gone.mtl"))
    assert not isinstance(missing.value, UnknownModelError)


def test_a_changed_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(pretrained.FOLDER, tmp_path / "pretrained")
    monkeypatch.setattr(pretrained, "FOLDER", folder)
    model = pretrained.registry()["tiny-1shot"]
    data = bytearray((folder / model.file).read_bytes())
    data[-1] ^= 1  # one bit of one weight: still a valid file, no longer the shipped one
    (folder / model.file).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="tiny-1shot.*sha256.*reinstall"):
        metatransfer.load("tiny-1shot")
    assert main(["info", "tiny-1shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has sha256" in err and "\n" not in err
    metatransfer.load("tiny-1shot-half")  # the others still load


def test_a_registry_entry_cannot_point_outside_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = shutil.copytree(pretrained.FOLDER, tmp_path / "pretrained")
    monkeypatch.setattr(pretrained, "FOLDER", folder)
    raw = json.loads((folder / pretrained.REGISTRY_FILE).read_text())
    raw["models"]["tiny-1shot"]["file"] = "../elsewhere.mtl"
    (folder / pretrained.REGISTRY_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match="'tiny-1shot' is malformed"):
        metatransfer.load("tiny-1shot")


def test_paths_work_as_before(
    shipped: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, run, _ = shipped
    exported = shutil.copy(folder / "tiny-1shot.mtl", tmp_path / "tiny-1shot.mtl")
    for model in (str(exported), Path(exported), run, str(run)):
        assert metatransfer.load(model).source == str(model)
    # A bare name that is a local file or folder and no shipped model is a path, as before.
    monkeypatch.chdir(tmp_path)
    assert metatransfer.load("tiny-1shot.mtl").source == "tiny-1shot.mtl"


def test_the_package_data_patterns_include_the_shipped_files() -> None:
    # A non-editable install copies only what package-data lists: the .mtl files and the registry.
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["metatransfer"]
    for name in ("pretrained/omniglot-5shot.mtl", f"pretrained/{pretrained.REGISTRY_FILE}"):
        assert any(fnmatch(name, p) for p in patterns), name
    assert pretrained.FOLDER.name == "pretrained"

"""Model files: every kind (backbone, meta model, export) goes through one validating loader, and every
malformed or hostile file is refused with one line naming it, before anything is allocated."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from metatransfer.cli import main
from metatransfer.config import Config, MetaConfig
from metatransfer.data.preprocess import Preprocess
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, prepare_backbone
from metatransfer.models.model_files import (
    ModelFileError,
    load_backbone,
    load_meta_model,
    read_model_file,
    save_backbone,
    save_meta_model,
)
from metatransfer.models.scale_shift import SSConv2d, convert_to_ss
from metatransfer.predict import export_model, load
from metatransfer.runs import load_weights

PRE = Preprocess(28, 1, (0.5,), (0.5,))


def _cfg() -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.backbone_args = "conv4", {"hidden": 4}
    cfg.meta = MetaConfig(way=3)
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid backbone file, meta model file and export of a tiny conv4."""
    tmp = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    cfg = _cfg()
    backbone = create_backbone("conv4", 1, hidden=4)
    save_backbone(tmp / "backbone.safetensors", backbone, cfg, PRE, epoch="1")
    prepare_backbone(backbone, cfg.meta)
    save_meta_model(tmp / "model.safetensors", MetaLearner(backbone, 3), cfg, PRE, tasks="0")
    export_model(tmp / "model.safetensors", tmp / "model.mtl")
    return {
        "backbone": tmp / "backbone.safetensors",
        "meta": tmp / "model.safetensors",
        "export": tmp / "model.mtl",
    }


def _rewrite(
    source: Path,
    target: Path,
    meta: Callable[[dict[str, str]], None] = lambda m: None,
    tensors: Callable[[dict[str, torch.Tensor]], None] = lambda t: None,
) -> Path:
    """A copy of `source` with its metadata and tensors edited in place by the two callbacks."""
    t, m = load_weights(source)
    meta(m)
    tensors(t)
    save_file(t, str(target), metadata=m)
    return target


def test_every_kind_round_trips(files: dict[str, Path]) -> None:
    backbone, pre, info = load_backbone(files["backbone"])
    assert pre == PRE and info["epoch"] == "1" and not backbone.training
    for kind in ("meta", "export"):
        learner, pre, meta = load_meta_model(files[kind])
        assert isinstance(learner, MetaLearner) and meta.way == 3 and pre == PRE
        assert read_model_file(files[kind]).kind == kind


def test_a_file_with_the_shifts_bn_batch_removes_still_loads(tmp_path: Path) -> None:
    # Written before convs feeding a batch-statistics BN lost their shift: the loader folds each one
    # into that BN's running mean, so the model computes what it did.
    cfg = _cfg()
    cfg.meta = MetaConfig(way=3, bn="batch", ss_granularity="kernel")
    torch.manual_seed(0)
    old = create_backbone("conv4", 1, hidden=4)
    convert_to_ss(old, granularity="kernel", train_bn=True)  # the old conversion: every conv has a shift
    learner = MetaLearner(old, 3)
    with torch.no_grad():
        for m in learner.modules():
            if isinstance(m, SSConv2d):
                assert m.shift is not None
                m.shift.normal_(0.0, 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None
                m.running_mean.normal_(0.0, 0.1)
    save_meta_model(tmp_path / "model.safetensors", learner, cfg, PRE, tasks="4")
    assert any(k.endswith(".shift") for k in load_weights(tmp_path / "model.safetensors")[0])
    loaded, _, meta = load_meta_model(tmp_path / "model.safetensors")
    assert meta.bn == "batch" and not any(n.endswith(".shift") for n, _ in loaded.named_parameters())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x), learner.eval().backbone(x), atol=1e-5, rtol=1e-5)
    export_model(tmp_path / "model.safetensors", tmp_path / "model.mtl")
    with torch.no_grad():
        exported = load_meta_model(tmp_path / "model.mtl")[0].backbone(x)
    torch.testing.assert_close(exported, loaded.backbone(x), atol=1e-5, rtol=1e-5)


def _set(key: str, value: str) -> Callable[[dict[str, str]], None]:
    return lambda m: m.__setitem__(key, value)


def _edit_json(key: str, edit: Callable[[dict], None]) -> Callable[[dict[str, str]], None]:
    def apply(m: dict[str, str]) -> None:
        d = json.loads(m[key])
        edit(d)
        m[key] = json.dumps(d)

    return apply


CORRUPTIONS: dict[str, tuple[str, dict, str]] = {
    # name: (kind of file, edits, what the message must say)
    "wrong tensor shape": (
        "backbone",
        {"tensors": lambda t: t.__setitem__("stages.0.0.weight", torch.zeros(4, 1, 5, 5))},
        "tensor stages.0.0.weight is [4, 1, 5, 5]",
    ),
    "broken backbone_args JSON": (
        "backbone",
        {"meta": _set("backbone_args", "{hidden: ")},
        "'backbone_args' is not valid JSON",
    ),
    "backbone_args not an object": (
        "backbone",
        {"meta": _set("backbone_args", "[4]")},
        "must be a JSON dict",
    ),
    "missing preprocess": (
        "backbone",
        {"meta": lambda m: m.pop("preprocess")},
        "lacks the metadata 'preprocess'",
    ),
    "bad preprocess": ("backbone", {"meta": _set("preprocess", '{"size": 28}')}, "'preprocess' is invalid"),
    "absurd width": (
        "backbone",
        {"meta": _set("backbone_args", '{"hidden": 100000}')},
        "hidden must be an integer in",
    ),
    "width mismatch": (
        "backbone",
        {"meta": _set("backbone_args", '{"hidden": 8}')},
        "tensor stages.0.0.weight is [4",
    ),
    "unknown backbone": (
        "backbone",
        {"meta": _set("backbone", "resnet9000")},
        "unknown backbone 'resnet9000'",
    ),
    "broken meta JSON": ("meta", {"meta": _set("meta", "{")}, "'meta' is not valid JSON"),
    "unknown meta key": (
        "meta",
        {"meta": _edit_json("meta", lambda d: d.__setitem__("wya", 5))},
        "'meta.wya'",
    ),
    "negative inner_steps_test": (
        "export",
        {"meta": _edit_json("meta", lambda d: d.__setitem__("inner_steps_test", -3))},
        "'meta.inner_steps_test' must be in [0,",
    ),
    "format_version abc": (
        "export",
        {"meta": _set("format_version", "abc")},
        "format_version must be a positive",
    ),
    "newer format_version": ("export", {"meta": _set("format_version", "99")}, "format version 99"),
    "scalar theta": (
        "export",
        {"tensors": lambda t: t.__setitem__("theta_weight", torch.tensor(1.0))},
        "tensor theta_weight is []",
    ),
    "missing tensor": ("meta", {"tensors": lambda t: t.pop("theta_bias")}, "missing theta_bias"),
    "extra tensor": ("meta", {"tensors": lambda t: t.__setitem__("evil", torch.zeros(1))}, "unexpected evil"),
    "all NaN": (
        "export",
        {"tensors": lambda t: [v.fill_(float("nan")) for v in t.values() if v.is_floating_point()]},
        "NaN or infinite",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_malformed_file_is_one_line_naming_it(files: dict[str, Path], tmp_path: Path, name: str) -> None:
    kind, edits, message = CORRUPTIONS[name]
    bad = _rewrite(files[kind], tmp_path / f"bad-{kind}.safetensors", **edits)
    started = time.perf_counter()
    with pytest.raises(ModelFileError) as info:
        read_model_file(bad)
    assert time.perf_counter() - started < 5  # nothing absurd was allocated
    text = str(info.value)
    assert str(bad) in text and message in text and "\n" not in text, text


def test_the_cli_reports_bad_model_files_in_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = _rewrite(files["export"], tmp_path / "nan.mtl", **CORRUPTIONS["all NaN"][1])
    support = tmp_path / "support"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (support / c).mkdir(parents=True)
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(support / c / "0.png")
    query = str(support / "a" / "0.png")
    assert main(["predict", str(nan), "--support", str(support), "--query", query]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and "NaN" in err and len(err.splitlines()) == 1
    # Exporting an export, or a backbone, is refused the same way.
    for source, what in (
        (files["export"], "already an exported model"),
        (files["backbone"], "pre-trained backbone"),
    ):
        assert main(["export", str(source), "--out", str(tmp_path / "again.mtl")]) == 2
        err = capsys.readouterr().err.strip()
        assert what in err and len(err.splitlines()) == 1
    with pytest.raises(ModelFileError, match="is a pre-trained backbone"):
        load(files["backbone"])

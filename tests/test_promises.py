"""Promises of the reliability table whose earlier tests could not fail when the promise broke.

- every numeric config key has a declared range (not only "a bad value happens to crash the run");
- published episodes are pinned to literal numbers, not recomputed with the same numpy call;
- dropout is active in train mode and off in eval mode;
- a way larger than the class count and a missing split are exit status 2 from `mtl`, one line.
"""

from __future__ import annotations

import shutil
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import numpy as np
import pytest
import torch

from metatransfer.cli import main
from metatransfer.config import Range, numeric_keys
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.models.backbones import create_backbone

from tiny import write_config, write_pattern_folder


def _unranged(tp: Any, ranged: bool = False) -> list[str]:
    """The int/float leaves of annotation `tp` that no Range bounds (a list's items need their own)."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        return _unranged(base, ranged or any(isinstance(m, Range) for m in meta))
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return [x for a in typing.get_args(tp) if a is not type(None) for x in _unranged(a, ranged)]
    if origin is list:
        return _unranged(typing.get_args(tp)[0])
    return [tp.__name__] if tp in (int, float) and not ranged else []


def test_every_numeric_config_key_declares_a_range() -> None:
    keys = dict(numeric_keys())
    assert len(keys) > 30 and "meta.way" in keys and "pretrain.lr" in keys
    missing = {key: leaves for key, tp in keys.items() if (leaves := _unranged(tp))}
    assert not missing, f"numeric keys without a declared Range: {missing}"


SIZES = [20, 25, 30, 20, 22, 40, 21, 20]  # images per class
OFFSETS = np.concatenate([[0], np.cumsum(SIZES)])


@pytest.mark.parametrize(
    ("seed", "index", "classes", "support", "query"),
    [
        (0, 0, [4, 7, 5], [116, 189, 144], [96, 95, 188, 195, 138, 141]),
        (3, 7, [7, 3, 4], [184, 87, 105], [190, 187, 79, 80, 116, 112]),
    ],
)
def test_published_episodes_are_pinned(
    seed: int, index: int, classes: list[int], support: list[int], query: list[int]
) -> None:
    """The numbers were recorded once; a change to the sampler that moves any episode fails here."""
    ep = EpisodeSampler(OFFSETS, 3, 1, 2, seed=seed).episode(index)
    assert ep.classes.tolist() == classes
    assert ep.support.tolist() == support
    assert ep.query.tolist() == query


def test_dropout_acts_in_train_mode_only() -> None:
    torch.manual_seed(0)
    net = create_backbone("resnet12", 3, widths=(4, 6, 8, 10), dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net.train()
        a, b = net(x), net(x)
        assert not torch.equal(a, b)  # a fresh mask per call
        net.eval()
        torch.testing.assert_close(net(x), net(x))
    without = create_backbone("resnet12", 3, widths=(4, 6, 8, 10), dropout=0.0)
    without.load_state_dict(net.state_dict())
    with torch.no_grad():  # eval mode with dropout 0.5 is exactly the net without dropout
        torch.testing.assert_close(net.eval()(x), without.eval()(x))


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    data = write_pattern_folder(tmp_path / "data")
    return write_config(tmp_path / "cfg.yaml", data, tmp_path / "cache")


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtl: error: ") and message in err[0], err


def test_a_way_larger_than_the_class_count_is_exit_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", "--config", str(config), "--out", str(out), "--set", "meta.way=9"]
    _one_line_exit_2(argv, capsys, "fewer than the 9-way episodes of meta.way")
    assert not out.exists()  # refused before any training


def test_a_missing_split_is_exit_2(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tmp_path / "data" / "test")
    out = tmp_path / "run"
    _one_line_exit_2(
        ["run", "--config", str(config), "--out", str(out)], capsys, "split 'test' is not present"
    )
    assert not out.exists()

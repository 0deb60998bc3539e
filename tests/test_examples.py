"""The scripts in examples/ run as written: training on an image-folder dataset, then classifying a
folder of images with the exported model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tiny import write_pattern_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# The example's own config, shrunk to seconds: a narrow ResNet-12, one epoch, a few tasks and episodes.
SMALL = [
    "model.backbone_args={widths: [8, 8, 8, 8]}", "precision=fp32", "compile=false",
    "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.val_episodes=5", "pretrain.val_shots=[1]",
    "meta.way=3", "meta.query=2", "meta.tasks=4", "meta.meta_batch=2", "meta.val_every=2",
    "meta.val_episodes=5", "meta.ht.enabled=false", "eval.ways=[3]", "eval.shots=[1]", "eval.query=2",
    "eval.episodes=5",
]  # fmt: skip


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("example")
    root = write_pattern_folder(tmp / "images", per_class=8)
    overrides = [a for kv in [*SMALL, f"data.cache_dir={tmp / 'cache'}"] for a in ("--set", kv)]
    run("train_image_folder.py", str(root), str(tmp / "out"), *overrides)
    return root, tmp / "out" / "model.mtl"


def test_training_on_an_image_folder_exports_a_model(trained: tuple[Path, Path]) -> None:
    _, model = trained
    assert model.stat().st_size > 0


def test_predicting_a_folder_with_a_model_file(trained: tuple[Path, Path], tmp_path: Path) -> None:
    root, model = trained
    classes = sorted((root / "test").iterdir())[:3]
    support, query = tmp_path / "support", tmp_path / "query"
    for c in classes:
        images = sorted(c.glob("*.png"))
        (support / c.name).mkdir(parents=True)
        (query / c.name).mkdir(parents=True)
        for i, image in enumerate(images):
            (support if i < 2 else query).joinpath(c.name, image.name).write_bytes(image.read_bytes())
    out = run("predict_folder.py", str(model), str(support), str(query)).stdout.splitlines()
    queries = sorted(query.rglob("*.png"))
    assert [line.split("\t")[0] for line in out] == [str(q) for q in queries]
    predicted = [line.split("\t")[1] for line in out]
    assert set(predicted) <= {c.name for c in classes}
    # Each class is its own blob pattern: even a one-epoch backbone separates most of them.
    correct = sum(p == q.parent.name for p, q in zip(predicted, queries, strict=True))
    assert correct / len(queries) > 0.5, out

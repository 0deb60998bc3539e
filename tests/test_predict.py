"""Using a meta-trained model on your own images: the Python API, `mtl predict`, `mtl export`."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import metatransfer
from metatransfer import predict
from metatransfer.cli import main
from metatransfer.config import Config, MetaConfig, to_yaml
from metatransfer.data.preprocess import Preprocess
from metatransfer.errors import UserError
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, inner_loop, prepare_backbone
from metatransfer.models.model_files import EXPORT_FORMAT, MODEL_FILE, save_meta_model
from metatransfer.models.scale_shift import SSConv2d
from metatransfer.predict import export_model, load
from metatransfer.runs import CONFIG_FILE, load_weights
from metatransfer.train.evaluate import classify, fit_linear

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def make_run(path: Path, channels: int, method: str = "mtl", seed: int = 0) -> Path:
    """A meta-train run directory holding a tiny conv4 model with random SS parameters (if any) and theta."""
    torch.manual_seed(seed)
    backbone = create_backbone("conv4", channels, hidden=8)
    meta = MetaConfig(method=method, way=5, inner_steps_test=50)
    prepare_backbone(backbone, meta)
    learner = MetaLearner(backbone, meta.way)
    with torch.no_grad():
        for m in learner.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, SSConv2d):
                m.scale.uniform_(0.5, 1.5)
                m.shift.normal_(0.0, 0.1)
        learner.theta_weight.normal_(0.0, 0.1)
        learner.theta_bias.normal_(0.0, 0.1)
    cfg = Config()
    cfg.model.backbone, cfg.model.backbone_args, cfg.meta = "conv4", {"hidden": 8}, meta
    cfg.precision = "fp32"  # what meta-test (and so predict, by default) runs this model with
    pre = Preprocess(28, channels, (0.5,) * channels, (0.25,) * channels)
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text(to_yaml(cfg))
    save_meta_model(path / MODEL_FILE, learner, cfg, pre, tasks="100")
    return path


def write_images(folder: Path, n: int, rng: np.random.Generator, level: int = 128) -> list[Path]:
    """n noisy grayscale PNGs around brightness `level`, 40x36 (so the model's 28 px resize is exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.clip(level + rng.integers(-30, 31, (36, 40)), 0, 255).astype(np.uint8)
        path = folder / f"{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("m") / "run", channels=1)


@pytest.fixture(scope="module")
def episode(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """support/<class>/ with 2 images each, and query/<class>/ with 3 each."""
    root = tmp_path_factory.mktemp("episode")
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        write_images(root / "support" / c, 2, rng, level=30 + 45 * k)
        write_images(root / "query" / c, 3, rng, level=30 + 45 * k)
    return root / "support", root / "query"


def support_set(folder: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(folder.glob("*/*.png"))
    return paths, [p.parent.name for p in paths]


def test_fit_predict_on_files(run: Path, episode: tuple[Path, Path]) -> None:
    support, query = episode
    learner = load(run).fit(*support_set(support))
    assert learner.classes == CLASSES
    paths, labels = support_set(query)
    proba = learner.predict_proba(paths)
    assert proba.shape == (len(paths), 5) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    predicted = learner.predict(paths)
    assert predicted == [CLASSES[i] for i in proba.argmax(1)]
    # Classes differ in brightness, which even a random backbone's features separate.
    assert np.mean([p == y for p, y in zip(predicted, labels, strict=True)]) > 0.6


def test_input_kinds_agree(run: Path, episode: tuple[Path, Path]) -> None:
    support, query = episode
    learner = load(run).fit(*support_set(support))
    paths, _ = support_set(query)
    expected = learner.predict_proba(paths)
    pil = [Image.open(p) for p in paths]
    gray = [np.asarray(im) for im in pil]  # [H, W] uint8
    rgb = [np.asarray(im.convert("RGB")) for im in pil]  # [H, W, 3]: converted to the model's 1 channel
    chw = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in rgb]  # [3, H, W] uint8 tensor
    floats = [torch.tensor(a)[None].float() / 255 for a in gray]  # [1, H, W] float in [0, 1]
    batch = np.stack(gray)[..., None]  # [B, H, W, 1]
    for images in (pil, gray, rgb, chw, floats, batch):
        np.testing.assert_allclose(learner.predict_proba(images), expected, atol=1e-6)


def test_rgb_model_accepts_gray_and_rgba(tmp_path: Path) -> None:
    learner = load(make_run(tmp_path / "rgb", channels=3))
    rng = np.random.default_rng(1)
    support = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    learner.fit(support, ["a", "b", "c"])
    rgba = np.concatenate([support[1], np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    proba = learner.predict_proba([support[1], rgba, support[1][:, :, 0]])
    np.testing.assert_allclose(proba[1], proba[0], atol=1e-6)  # opaque alpha is dropped
    assert proba[2].shape == (3,)  # grayscale is broadcast to 3 channels


def test_predictions_invariant_to_support_order(run: Path, episode: tuple[Path, Path]) -> None:
    support, query = episode
    paths, labels = support_set(support)
    queries, _ = support_set(query)
    expected = load(run).fit(paths, labels).predict_proba(queries)
    pairs = list(zip(paths, labels, strict=True))
    random.Random(3).shuffle(pairs)
    shuffled = load(run).fit([p for p, _ in pairs], [y for _, y in pairs]).predict_proba(queries)
    assert np.array_equal(shuffled, expected)


def test_export_matches_run(run: Path, episode: tuple[Path, Path], tmp_path: Path) -> None:
    support, query = episode
    out = export_model(run, tmp_path / "model.mtl")
    tensors, info = load_weights(out)
    assert info["format"] == EXPORT_FORMAT and info["tasks"] == "100" and info["precision"] == "fp32"
    assert not any(k.endswith((".scale", ".shift")) for k in tensors)  # SS folded away
    exported = load(out)
    assert exported.runtime.precision == "fp32"  # the run's, recorded at export
    assert load(out, precision="bf16").runtime.precision == "bf16"
    assert not any(isinstance(m, SSConv2d) for m in exported.model.modules())
    queries, _ = support_set(query)
    p_run = load(run).fit(*support_set(support)).predict_proba(queries)
    p_out = exported.fit(*support_set(support)).predict_proba(queries)
    np.testing.assert_allclose(p_out, p_run, atol=1e-5)
    assert np.array_equal(p_out.argmax(1), p_run.argmax(1))
    # The run's model.safetensors itself is accepted too.
    np.testing.assert_allclose(
        load(run / MODEL_FILE).fit(*support_set(support)).predict_proba(queries), p_run, atol=0
    )


def test_export_never_replaces_a_run_file_and_needs_overwrite(
    episode: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = make_run(tmp_path / "run", channels=1)
    model = (run / MODEL_FILE).read_bytes()
    for target, problem in (
        (run / MODEL_FILE, "is a file of the run"),
        (run / CONFIG_FILE, "is a file of the run"),
        (tmp_path, "is a folder"),
    ):
        assert main(["export", str(run), "--out", str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and "\n" not in err
    assert (run / MODEL_FILE).read_bytes() == model
    load(run)  # still usable
    existing = tmp_path / "model.mtl"
    existing.write_bytes(b"an older export")
    assert main(["export", str(run), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"an older export"
    assert main(["export", str(run), "--out", str(existing), "--overwrite"]) == 0
    assert load_weights(existing)[1]["format"] == EXPORT_FORMAT
    # An export written into the run folder is not one of the run's files: it may be replaced.
    assert main(["export", str(run), "--out", str(run / "model.mtl")]) == 0
    assert main(["export", str(run), "--out", str(run / "model.mtl"), "--overwrite"]) == 0


@pytest.mark.parametrize("method", ["ss-last", "ft-last"])
def test_export_other_methods(method: str, episode: tuple[Path, Path], tmp_path: Path) -> None:
    run = make_run(tmp_path / method, channels=1, method=method)
    queries, _ = support_set(episode[1])
    p_run = load(run).fit(*support_set(episode[0])).predict_proba(queries)
    p_out = load(export_model(run, tmp_path / "m.mtl")).fit(*support_set(episode[0])).predict_proba(queries)
    np.testing.assert_allclose(p_out, p_run, atol=1e-5)


def test_cli_predict_table_json_and_export(
    run: Path,
    episode: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    support, query = episode
    model = tmp_path / "model.mtl"
    assert main(["export", str(run), "--out", str(model)]) == 0
    assert model.is_file()
    capsys.readouterr()
    assert main(["predict", str(model), "--support", str(support), "--query", str(query), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    queries, _ = support_set(query)
    assert [r["file"] for r in rows] == [str(q) for q in queries]
    expected = load(run).fit(*support_set(support)).predict(queries)
    assert [r["class"] for r in rows] == expected
    assert all(len(r["runner_ups"]) == 2 for r in rows)
    argv = ["predict", str(run), "--support", str(support), "--query", str(queries[0]), "--top-k", "9"]
    assert main(argv) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["file", "class", "prob"]
    assert line.startswith(str(queries[0])) and line.count(",") == 3  # top-k capped at the 5 classes


def test_cli_reports_corrupt_query_and_continues(
    run: Path,
    episode: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    support, query = episode
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    good = sorted(query.glob("ant/*.png"))[0]
    code = main(["predict", str(run), "--support", str(support), "--query", str(good), str(bad)])
    out, err = capsys.readouterr()
    assert code == 1
    assert str(bad) in out and "ERROR" in out and "1 of 2 query images" in err
    assert out.splitlines()[1].startswith(str(good)) and "ERROR" not in out.splitlines()[1]


@pytest.mark.parametrize(
    "problem", ["no class", "one class", "empty class", "corrupt support", "missing query"]
)
def test_cli_refuses_bad_support(
    problem: str,
    run: Path,
    episode: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = np.random.default_rng(2)
    support = tmp_path / "support"
    first = write_images(support / "a", 1, rng)[0]
    named = str(support)
    query = str(sorted(episode[1].glob("*/*.png"))[0])
    if problem == "no class":
        first.rename(support / "loose.png")
        (support / "a").rmdir()
    elif problem != "one class":
        write_images(support / "b", 1, rng)
    if problem == "empty class":
        (support / "c").mkdir()
        named = str(support / "c")
    elif problem == "corrupt support":
        first.write_bytes(b"")
        named = str(first)
    elif problem == "missing query":
        query = named = str(tmp_path / "nope.png")
    assert main(["predict", str(run), "--support", str(support), "--query", query]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and named in err and "\n" not in err


def test_api_errors(run: Path, episode: tuple[Path, Path], tmp_path: Path) -> None:
    learner = load(run)
    image = np.zeros((28, 28), np.uint8)
    with pytest.raises(UserError, match="before predicting"):
        learner.predict([image])
    with pytest.raises(UserError, match="at least 2 classes"):
        learner.fit([image, image], ["x", "x"])
    with pytest.raises(UserError, match="2 images but 1 labels"):
        learner.fit([image, image], ["x"])
    with pytest.raises(UserError, match=r"float pixels must lie in \[0, 1\]"):
        learner.fit([image * 1.0 + 2, image], ["x", "y"])
    with pytest.raises(UserError, match=r"image 0: the image is empty \(shape \[0, 0, 1\]\)"):
        learner.fit([np.zeros((0, 0), np.float32), image], ["x", "y"])
    with pytest.raises(UserError, match="wrap a single image in a list"):
        learner.predict("x.png")
    pickled = tmp_path / "model.pt"
    torch.save({"theta": torch.zeros(1)}, pickled)
    with pytest.raises(UserError, match="not a safetensors file"):
        load(pickled)
    with pytest.raises(UserError, match="holds no model.safetensors"):
        load(tmp_path)
    with pytest.raises(UserError, match="'precision' is 'fp8'; choose one of auto"):
        load(run, precision="fp8")


def test_repr_names_the_model_classes_and_device(run: Path, episode: tuple[Path, Path]) -> None:
    learner = load(run, device="cpu")
    assert repr(learner).startswith(f"FewShotLearner(model={str(run)!r}, classes=none (call fit)")
    learner.fit(*support_set(episode[0]))
    text = repr(learner)
    assert "classes=['ant', 'bee', 'cat', 'dog', 'eel'] (5)" in text
    assert "device='cpu'" in text and "precision='fp32'" in text and "image_size=28" in text
    assert learner.classes_ is learner.classes and learner.classes_ == CLASSES


def test_fit_adapts_once_and_predictions_reuse_it(
    run: Path, episode: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    support, query = episode
    calls = []

    def counted(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return fit_linear(*args, **kwargs)

    monkeypatch.setattr(predict, "fit_linear", counted)
    learner = load(run).fit(*support_set(support))
    queries, labels = support_set(query)
    proba = learner.predict_proba(queries)
    learner.predict(queries)
    learner.score(queries, labels)
    assert len(calls) == 1
    # The kept classifier scores exactly as meta-test's classify, which adapts on every call.
    paths, names = support_set(support)
    xs = learner.features(learner.to_arrays(paths))
    ys = torch.tensor([CLASSES.index(n) for n in names])  # paths are sorted by class already
    xq = learner.features(learner.to_arrays(queries))
    loop = inner_loop(learner.meta, test=True)
    scores = classify(xs[None], ys[None], xq[None], 5, "linear", loop, learner.model.frozen_init(5))
    np.testing.assert_allclose(proba, torch.softmax(scores[0], -1).numpy(), atol=1e-6)


def test_score_is_accuracy(run: Path, episode: tuple[Path, Path]) -> None:
    support, query = episode
    learner = load(run).fit(*support_set(support))
    queries, labels = support_set(query)
    predicted = learner.predict(queries)
    expected = np.mean([p == y for p, y in zip(predicted, labels, strict=True)])
    assert learner.score(queries, labels) == pytest.approx(expected)
    wrong = [
        CLASSES[(CLASSES.index(p) + 1) % 5] for p in predicted
    ]  # every label differs from its prediction
    assert learner.score(queries, wrong) == 0.0
    with pytest.raises(ValueError, match="label 'cow', not one of the classes"):
        learner.score(queries[:1], ["cow"])
    with pytest.raises(ValueError, match="2 images and 1 labels"):
        learner.score(queries[:2], labels[:1])


def test_bad_input_errors_are_value_or_type_errors(run: Path) -> None:
    learner = load(run)
    image = np.zeros((28, 28), np.uint8)
    with pytest.raises(metatransfer.NotFittedError) as not_fitted:
        learner.predict([image])
    assert isinstance(not_fitted.value, ValueError) and isinstance(not_fitted.value, AttributeError)
    for call, kind in (
        (lambda: learner.fit([image, image], ["x", "x"]), ValueError),
        (lambda: learner.fit([image * 1.0 + 2, image], ["x", "y"]), ValueError),
        (lambda: learner.fit([np.zeros((28, 28, 7, 2)), image], ["x", "y"]), ValueError),
        (lambda: learner.fit([image.astype(np.int32), image], ["x", "y"]), TypeError),
        (lambda: learner.fit([object(), image], ["x", "y"]), TypeError),
        (lambda: learner.fit("x.png", ["x"]), TypeError),
    ):
        with pytest.raises(kind) as caught:
            call()
        assert isinstance(caught.value, metatransfer.UserError)
    for name in metatransfer.__all__:  # every error a caller may catch is importable from the package
        assert hasattr(metatransfer, name), name
    assert issubclass(metatransfer.ModelFileError, metatransfer.UserError)


def test_load_defaults_to_device_auto(run: Path) -> None:
    assert inspect.signature(load).parameters["device"].default == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert load(run).runtime.device.type == expected

"""Use a meta-trained model on your own images: `load`, `FewShotLearner`, `mtl predict`, `mtl export`.

    learner = metatransfer.load("omniglot-5shot")             # shipped name, run directory or .mtl file
    learner.fit(["cat1.png", "dog1.png"], ["cat", "dog"])     # support set: >= 2 classes
    learner.predict(["x.png", "y.png"])                       # -> ["dog", "cat"]
    learner.predict_proba(["x.png"])                          # -> [[0.1, 0.9]], columns = learner.classes_
    learner.score(["x.png", "y.png"], ["dog", "cat"])         # -> 1.0 (accuracy)

`fit` adapts the base learner exactly as meta-test does: features in eval mode, then the inner loop
(`inner_steps_test` steps) from the meta-learned theta; `predict` and `predict_proba` then only compute
the queries' features and apply that adapted classifier. An exported `.mtl` file is one safetensors file:
the SS parameters folded into plain convolutions, theta, and the config as JSON metadata; nothing is
ever unpickled.

`mtl` imports this module only when `predict` or `export` runs, and `metatransfer.load` imports it on
first use, so `mtl --help` and `import metatransfer` do not pay for importing torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metatransfer.card import CARD_KEY, build_card, card_from_metadata, now_iso
from metatransfer.config import DataConfig, MetaConfig, build_config, load_config
from metatransfer.data.preprocess import Preprocess
from metatransfer.data.readers.base import IMAGE_EXTENSIONS, class_folders_split, read_regular_file
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import (
    ImageStore,
    decode_error_reason,
    decode_image,
    open_split,
    refuse_decompression_bombs,
)
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.errors import InputError, InputTypeError, NotFittedError, UserError
from metatransfer.models.base_learner import logits, prepare
from metatransfer.models.meta_learner import MetaLearner, inner_loop
from metatransfer.models.model_files import (
    MODEL_FILE,
    ModelFileError,
    export_metadata,
    read_model_file,
)
from metatransfer.models.scale_shift import fold_ss
from metatransfer.pretrained import resolve
from metatransfer.runs import CONFIG_FILE, lock_if_ours, run_file_owner, save_weights
from metatransfer.train.evaluate import evaluate_features, extract_features, fit_linear

ImageInput = str | os.PathLike[str] | Image.Image | np.ndarray | torch.Tensor
Images = Sequence[ImageInput] | np.ndarray | torch.Tensor


def _hwc_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """An image array -> [H, W, C] uint8 (C in 1, 3, 4), following the conventions documented on `FewShotLearner`."""
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
        if a.shape[0] not in (1, 3, 4):
            raise InputError(
                f"{what}: shape {a.shape} has no channel axis of size 1, 3 or 4; pass [H, W, C] or [C, H, W]"
            )
        a = a.transpose(1, 2, 0)
    elif a.ndim != 3:
        raise InputError(f"{what}: expected an image of shape [H, W], [H, W, C] or [C, H, W], got {a.shape}")
    if a.size == 0:
        raise InputError(f"{what}: the image is empty (shape {list(a.shape)})")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise InputTypeError(
            f"{what}: pixel type {a.dtype} is not supported; pass uint8 (0-255) or float (0-1)"
        )
    lo, hi = float(a.min()), float(a.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also False for NaN
        raise InputError(
            f"{what}: float pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; scale them or pass uint8"
        )
    return np.ascontiguousarray(np.rint(a * 255.0).astype(np.uint8))


def image_array(image: ImageInput, pre: Preprocess, what: str = "image") -> np.ndarray:
    """One image -> [size, size, channels] uint8, decoded, converted and resized exactly as the image cache does.

    A path that cannot be read or decoded raises InputError (a UserError and ValueError) naming it.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with refuse_decompression_bombs():
                return decode_image(read_regular_file(path), pre.size, pre.channels)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
            raise InputError(
                f"cannot read image {path}: {decode_error_reason(e)}; replace or remove it"
            ) from e
    if isinstance(image, Image.Image):
        # The conversion decode_image would apply to the file's decoded image, then its resize.
        converted = np.asarray(image.convert("L" if pre.channels == 1 else "RGB"))
        return decode_image(_hwc_uint8(converted, what), pre.size, pre.channels)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        image = (t.float() if t.is_floating_point() else t).numpy()
    if isinstance(image, np.ndarray):
        return decode_image(_hwc_uint8(image, what), pre.size, pre.channels)
    raise InputTypeError(
        f"{what}: unsupported type {type(image).__name__}; pass a file path, a PIL image, a numpy array or a tensor"
    )


def _items(images: Images) -> list[ImageInput]:
    """The images of a batch argument: a sequence, or a 4-D array/tensor [B, H, W, C] / [B, C, H, W]."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise InputTypeError("expected a list of images; wrap a single image in a list: [image]")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim != 4:
        raise InputError(
            f"an array of images must be a batch [B, H, W, C] or [B, C, H, W], got shape {tuple(images.shape)}; "
            "pass a list for separate images"
        )
    return list(images)


def _stack(arrays: Sequence[np.ndarray], pre: Preprocess) -> np.ndarray:
    """[size, size, channels] uint8 arrays -> [n, size, size, channels] (n may be 0)."""
    shape = (0, pre.size, pre.size, pre.channels)
    return np.stack(arrays) if arrays else np.zeros(shape, dtype=np.uint8)


def _sorted_classes(labels: Iterable[Hashable]) -> list[Hashable]:
    unique = set(labels)
    try:
        return sorted(unique)  # type: ignore[type-var]
    except TypeError:  # labels of mixed, unordered types: still a deterministic order
        return sorted(unique, key=repr)


class FewShotLearner:
    """A meta-trained model ready to learn new classes from a few labelled images (see module docstring).

    Images may be given as file paths (str or Path), PIL images, or arrays/tensors: numpy arrays and
    torch tensors alike may be [H, W] (grayscale), [H, W, C] or [C, H, W] with C in 1, 3, 4 (RGBA: alpha
    dropped); the channel axis is the last one if its size is 1, 3 or 4, else the first. Pixels are
    uint8 in 0-255 or floats in [0, 1] (rounded to uint8, as training images were stored). A batch may
    also be one 4-D array/tensor. Every image is then converted to the model's channels, resized to its
    square size and normalised with its mean/std, exactly as the training images were.

    Bad arguments raise `InputError` (also a ValueError) or `InputTypeError` (also a TypeError);
    predicting before `fit` raises `NotFittedError`. All are exported from `metatransfer`.
    """

    def __init__(
        self,
        model: MetaLearner,
        pre: Preprocess,
        meta: MetaConfig,
        runtime: Runtime,
        card: dict[str, Any] | None = None,
        source: str = "model",
    ) -> None:
        self.model = model.eval()
        self.pre = pre
        self.meta = meta
        self.runtime = runtime
        # What the model is (data, backbone, config, results; see `metatransfer.card`); None for files
        # exported before cards existed.
        self.card = card
        self.source = source  # the shipped name or the path it was loaded from, for repr
        self.classes: list[Hashable] = []  # after fit: the sorted labels; column order of predict_proba
        # After fit: the base learner adapted on the support set, weights [1, way, d] and bias [1, way].
        self._classifier: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def classes_(self) -> list[Hashable]:
        """`classes`, under scikit-learn's name for what `fit` learned."""
        return self.classes

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self.classes[:8])) + (", ..." if len(self.classes) > 8 else "")
        classes = f"[{shown}] ({len(self.classes)})" if self.classes else "none (call fit)"
        return (
            f"FewShotLearner(model={self.source!r}, classes={classes}, device={str(self.runtime.device)!r}, "
            f"precision={self.runtime.precision!r}, image_size={self.pre.size})"
        )

    def to_arrays(self, images: Images) -> np.ndarray:
        """Images -> [n, size, size, channels] uint8, as the model sees them before normalisation."""
        arrays = [image_array(x, self.pre, f"image {i}") for i, x in enumerate(_items(images))]
        return _stack(arrays, self.pre)

    def features(self, arrays: np.ndarray) -> torch.Tensor:
        """[n, size, size, channels] uint8 -> backbone features [n, d] float32 (eval mode), as meta-test computes them."""
        store = ImageStore.from_offsets(arrays, np.array([0, len(arrays)]), ["images"], "predict")
        return extract_features(self.model.backbone, store, self.runtime, self.pre.mean, self.pre.std)

    def fit(self, images: Images, labels: Sequence[Hashable]) -> FewShotLearner:
        """Learn the classes of a support set: `images` with their `labels` (any hashable, e.g. names).

        Classes are the sorted distinct labels (at least 2); the support is put in a canonical order
        (by class, then by pixel content) first, so the result does not depend on the order given.
        The base learner is adapted here, once; predictions reuse it. Returns self.
        """
        arrays = self.to_arrays(images)
        labels = list(labels)
        if len(labels) != len(arrays):
            raise InputError(
                f"fit got {len(arrays)} images but {len(labels)} labels; give one label per image"
            )
        classes = _sorted_classes(labels)
        if len(classes) < 2:
            raise InputError(
                f"fit needs support images of at least 2 classes, got {len(classes)} ({classes}); add another class"
            )
        index = {c: i for i, c in enumerate(classes)}
        y = [index[label] for label in labels]
        order = sorted(range(len(y)), key=lambda i: (y[i], hashlib.sha1(arrays[i].tobytes()).digest()))
        xs, ys = self.features(arrays[order]), torch.tensor([y[i] for i in order])
        way = len(classes)
        with torch.no_grad():
            loop = inner_loop(self.meta, test=True)
            self._classifier = fit_linear(xs[None], ys[None], way, loop, self.model.frozen_init(way))
        self.classes = classes
        return self

    def probabilities(self, arrays: np.ndarray) -> np.ndarray:
        """[n, size, size, channels] uint8 (see `to_arrays`) -> class probabilities [n, len(classes)] float32."""
        if self._classifier is None:
            raise NotFittedError("call fit(support_images, support_labels) before predicting")
        if len(arrays) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        w, b = self._classifier
        loop = inner_loop(self.meta, test=True)
        with torch.no_grad():
            scores = logits(prepare(self.features(arrays)[None], loop), w, b, loop)
            return torch.softmax(scores[0], dim=-1).numpy()

    def predict_proba(self, images: Images) -> np.ndarray:
        """Softmax of the adapted classifier's logits: [n, len(classes)], columns in `self.classes` order."""
        return self.probabilities(self.to_arrays(images))

    def predict(self, images: Images) -> list[Hashable]:
        """The most probable class (a label given to `fit`) of each image."""
        return [self.classes[int(i)] for i in self.predict_proba(images).argmax(1)]

    def score(self, images: Images, labels: Sequence[Hashable]) -> float:
        """Accuracy of `predict(images)` against `labels` (each one of `classes`), in [0, 1]."""
        if self._classifier is None:
            raise NotFittedError("call fit(support_images, support_labels) before score")
        arrays, labels = self.to_arrays(images), list(labels)
        if len(labels) != len(arrays) or not labels:
            raise InputError(
                f"score got {len(arrays)} images and {len(labels)} labels; give one label per image, at least one"
            )
        known = set(self.classes)
        unknown = [y for y in labels if y not in known]
        if unknown:
            # A typo in a label would otherwise pass silently as a wrong prediction.
            raise InputError(
                f"score got the label {unknown[0]!r}, not one of the classes fit learned: {self.classes}"
            )
        predicted = self.probabilities(arrays).argmax(1)
        return float(np.mean([self.classes[int(p)] == y for p, y in zip(predicted, labels, strict=True)]))


def meta_test_learner(
    learner: FewShotLearner,
    data: DataConfig,
    split: str,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
) -> np.ndarray:
    """Per-episode query accuracy [episodes] of `learner` on episodes 0..episodes-1 (seed `seed`) of `data`'s
    `split`, scored as `mtl meta-test` scores them: its sampler, eval-mode features, batched inner loop.

    Only the images those episodes draw are read through the backbone, so a few hundred episodes of a
    large split stay quick. `data.size` is set to the model's own image size.
    """
    store = open_split(dataclasses.replace(data, size=learner.pre.size), split, progress=False)
    sampler = EpisodeSampler(store, way, shot, query, seed)
    rows = np.unique(
        np.concatenate([np.concatenate([e.support, e.query]) for e in map(sampler.episode, range(episodes))])
    )
    backbone = learner.model.backbone
    feats = torch.zeros(len(store), int(backbone.out_dim))  # type: ignore[arg-type]
    feats[torch.from_numpy(rows)] = extract_features(
        backbone, store, learner.runtime, learner.pre.mean, learner.pre.std, indices=rows
    )
    loop = inner_loop(learner.meta, test=True)
    return evaluate_features(
        feats, sampler, episodes, "linear", loop=loop, init=learner.model.frozen_init(way)
    )


def load(
    model: str | os.PathLike[str], *, device: str = "auto", precision: str | None = None
) -> FewShotLearner:
    """A `FewShotLearner` from a shipped model's name (`mtl models`), an exported `.mtl` file, a meta-train
    run directory or its model.safetensors.

    A name resolves only to the file the package's registry lists, after checking its sha256
    (`ChecksumError` otherwise); an unknown name raises `UnknownModelError` listing the shipped ones.
    `device`: "auto" (default: CUDA if available, else the CPU, as training), "cpu", "cuda" or "cuda:N".
    `precision`: None (default) uses the model's own setting, as `mtl meta-test` does (the run's config,
    usually "auto": bf16 on CPUs with native bf16, else fp32), so predictions match meta-test's; "fp32"
    gives the same numbers on every machine; or "auto", "bf16", "fp16" (CUDA).
    """
    resolved, name = resolve(model)
    path = _model_path(resolved)
    f = read_model_file(path)  # validates any model file
    if f.meta is None or not isinstance(f.module, MetaLearner):
        raise ModelFileError(
            f"{path} is a pre-trained backbone; pass a meta-train run directory or a .mtl file"
        )
    precision = precision or _recorded_precision(path, f.info)
    runtime = resolve_runtime(build_config([{"device": device, "precision": precision}]))
    runtime.model(f.module)
    card = card_from_metadata(f.info) if f.kind == "export" else build_card(path)
    return FewShotLearner(f.module, f.pre, f.meta, runtime, card, source=name or str(model))


def _model_path(model: str | os.PathLike[str]) -> Path:
    """A model file, or a run directory's MODEL_FILE (UserError if it holds none)."""
    path = Path(model)
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.exists():
            raise UserError(
                f"{path.parent} holds no {MODEL_FILE}; pass a meta-train run directory or a .mtl file"
            )
    return path


def _recorded_precision(model_file: Path, info: dict[str, str]) -> str:
    """The precision meta-test runs this model with: an export's record, else its run's config.yaml, else auto."""
    if "precision" in info:
        return info["precision"]
    config = model_file.parent / CONFIG_FILE
    return load_config(config).precision if config.is_file() else "auto"


def export_model(
    run: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False, fp16: bool = False
) -> Path:
    """Write a meta-train run's model (the run directory or its model.safetensors) as one portable file.

    Tensors: the MetaLearner's state with every SS conv folded into a plain conv with bias
    (`fold_ss`), and theta; with `fp16`, float tensors are stored in half precision (half the size;
    loading turns them back into fp32). Metadata: the run's (backbone, backbone_args, preprocess,
    meta, ...) plus `format`/`format_version`, the run's `precision`, `storage` and the model `card`.
    An existing `out` is replaced only with `overwrite`, and never when it is one of a run's own
    files. Returns the written path.
    """
    source = Path(run)
    if source.is_dir():
        source = source / MODEL_FILE
    if not source.is_file():
        raise UserError(f"no meta-trained model at {source}; pass a meta-train run directory")
    out = Path(out)
    _check_export_target(out, overwrite, run_file_owner(out))
    model = read_model_file(source)
    if model.kind != "meta" or not isinstance(model.module, MetaLearner):
        what = (
            "already an exported model; copy the file" if model.kind == "export" else "a pre-trained backbone"
        )
        raise ModelFileError(f"{source} is {what}; export a meta-train run's {MODEL_FILE}")
    storage = "fp16" if fp16 else "fp32"
    metadata = {
        **export_metadata(model.info, _recorded_precision(source, model.info), storage),
        CARD_KEY: json.dumps(build_card(source, created=now_iso())),
    }
    state = fold_ss(model.module).state_dict()
    if fp16:
        state = {k: t.half() if t.dtype == torch.float32 else t for k, t in state.items()}
        overflow = [
            k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if overflow:
            raise UserError(f"{source}: tensor {overflow[0]} exceeds the fp16 range; export it in fp32")
    # Not recorded as a run file: `--overwrite` of a run it was written into leaves the export alone.
    with lock_if_ours(out.parent, "export"):  # a run folder is written only under its lock
        save_weights(out, state, metadata, record=False)
    return out


def _check_export_target(out: Path, overwrite: bool, owner: Path | None) -> None:
    """Refuse a folder, a run's own file (`owner`: that run), or an existing file without `overwrite`."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.mtl'}")
    if owner is not None:
        raise UserError(
            f"--out {out} is a file of the run {owner}; export to a file outside the run's own files"
        )
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")


@dataclass(frozen=True)
class QueryResult:
    """One query file's outcome: the top classes with probabilities, or why it could not be read."""

    file: str
    top: list[tuple[str, float]]  # best first; empty when `error` is set
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        cls, p = self.top[0]
        rest = [{"class": c, "probability": q} for c, q in self.top[1:]]
        return {"file": self.file, "class": cls, "probability": p, "runner_ups": rest}


def query_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly (whatever their extension) plus the images found recursively in folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.exists():
            found.append(p)
        else:
            raise UserError(f"query path {p} does not exist")
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no query images found in {', '.join(map(str, paths))} (looked for {exts})")
    return found


def predict_folder(
    learner: FewShotLearner, support: str | os.PathLike[str], queries: Sequence[Path], top_k: int = 3
) -> list[QueryResult]:
    """Fit on `support` (one sub-folder of images per class) and classify each query file.

    Support problems (fewer than 2 classes, an empty class folder, an unreadable image) raise
    UserError; an unreadable query file becomes a result with `error` set.
    """
    root = Path(support)
    if not root.is_dir():
        raise UserError(f"support folder {root} does not exist; give a folder with one sub-folder per class")
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(folders) < 2:
        raise UserError(
            f"support folder {root} holds {len(folders)} class folder(s); add at least 2 (one per class)"
        )
    spec = class_folders_split(root, "support", learner.pre.channels)
    paths = [src.key for sources in spec.sources for src in sources]
    labels = [c for c, sources in zip(spec.classes, spec.sources, strict=True) for _ in sources]
    learner.fit(paths, labels)
    results: dict[int, QueryResult] = {}
    good: list[int] = []
    arrays = []
    for i, q in enumerate(queries):
        try:
            arrays.append(image_array(q, learner.pre))
            good.append(i)
        except UserError as e:
            results[i] = QueryResult(str(q), [], str(e))
    probs = learner.probabilities(_stack(arrays, learner.pre))
    k = max(1, min(top_k, len(learner.classes)))
    for i, row in zip(good, probs, strict=True):
        best = np.argsort(-row, kind="stable")[:k]
        results[i] = QueryResult(str(queries[i]), [(str(learner.classes[j]), float(row[j])) for j in best])
    return [results[i] for i in range(len(queries))]


def format_table(results: Sequence[QueryResult]) -> str:
    """Columns file, class, probability, runner-ups (class and probability); errors in the class column."""
    rows = [("file", "class", "prob", "runner-ups")]
    for r in results:
        if r.error is not None:
            rows.append((r.file, "ERROR", "", r.error))
        else:
            rest = ", ".join(f"{c} {p:.3f}" for c, p in r.top[1:])
            rows.append((r.file, r.top[0][0], f"{r.top[0][1]:.3f}", rest))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows
    )

"""Use a meta-trained model on your own images: `load`, `FewShotLearner`, `mtl predict`, `mtl export`.

    learner = metatransfer.load("runs/omniglot/meta")          # run directory or exported .mtl file
    learner.fit(["cat1.png", "dog1.png"], ["cat", "dog"])     # support set: >= 2 classes
    learner.predict(["x.png", "y.png"])                       # -> ["dog", "cat"]
    learner.predict_proba(["x.png"])                          # -> [[0.1, 0.9]], columns = learner.classes

`fit` adapts the base learner exactly as meta-test does: features in eval mode, then the inner loop
(`inner_steps_test` steps) from the meta-learned theta. An exported `.mtl` file is one safetensors file:
the SS parameters folded into plain convolutions, theta, and the config as JSON metadata; nothing is
ever unpickled.

torch and the training code are imported inside the functions: `mtl` registers these commands when it
builds its parser, and `mtl --help` should not pay for importing torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metatransfer.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from metatransfer.config import MetaConfig
    from metatransfer.device import Runtime
    from metatransfer.models.meta_learner import MetaLearner
    from metatransfer.train.common import Preprocess

    ImageInput = str | os.PathLike[str] | Image.Image | np.ndarray | torch.Tensor
    Images = Sequence[ImageInput] | np.ndarray | torch.Tensor

EXPORT_FORMAT = "metatransfer-model"  # metadata "format" of an exported file
EXPORT_VERSION = 1  # bump when the exported layout changes; `load` refuses newer versions


def _hwc_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """An image array -> [H, W, C] uint8 (C in 1, 3, 4), following the conventions documented on `FewShotLearner`."""
    import numpy as np

    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
        if a.shape[0] not in (1, 3, 4):
            raise UserError(
                f"{what}: shape {a.shape} has no channel axis of size 1, 3 or 4; pass [H, W, C] or [C, H, W]"
            )
        a = a.transpose(1, 2, 0)
    elif a.ndim != 3:
        raise UserError(f"{what}: expected an image of shape [H, W], [H, W, C] or [C, H, W], got {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"{what}: pixel type {a.dtype} is not supported; pass uint8 (0-255) or float (0-1)")
    lo, hi = float(a.min()), float(a.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also False for NaN
        raise UserError(
            f"{what}: float pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; scale them or pass uint8"
        )
    return np.ascontiguousarray(np.rint(a * 255.0).astype(np.uint8))


def image_array(image: ImageInput, pre: Preprocess, what: str = "image") -> np.ndarray:
    """One image -> [size, size, channels] uint8, decoded, converted and resized exactly as the image cache does.

    A path that cannot be read or decoded raises UserError naming it.
    """
    import numpy as np
    import torch
    from PIL import Image

    from metatransfer.data.store import decode_image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return decode_image(path.read_bytes(), pre.size, pre.channels)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
            from metatransfer.data.store import decode_error_reason

            raise UserError(
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
    raise UserError(
        f"{what}: unsupported type {type(image).__name__}; pass a file path, a PIL image, a numpy array or a tensor"
    )


def _items(images: Images) -> list[ImageInput]:
    """The images of a batch argument: a sequence, or a 4-D array/tensor [B, H, W, C] / [B, C, H, W]."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise UserError("expected a list of images; wrap a single image in a list: [image]")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim != 4:
        raise UserError(
            f"an array of images must be a batch [B, H, W, C] or [B, C, H, W], got shape {tuple(images.shape)}; "
            "pass a list for separate images"
        )
    return list(images)


def _stack(arrays: Sequence[np.ndarray], pre: Preprocess) -> np.ndarray:
    """[size, size, channels] uint8 arrays -> [n, size, size, channels] (n may be 0)."""
    import numpy as np

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
    """

    def __init__(
        self,
        model: MetaLearner,
        pre: Preprocess,
        meta: MetaConfig,
        runtime: Runtime,
        card: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.pre = pre
        self.meta = meta
        self.runtime = runtime
        # What the model is (data, backbone, config, results; see `metatransfer.card`); None for files
        # exported before cards existed.
        self.card = card
        self.classes: list[Hashable] = []  # after fit: the sorted labels; column order of predict_proba
        self._support: tuple[torch.Tensor, torch.Tensor] | None = None  # features [n, d], labels [n]

    def to_arrays(self, images: Images) -> np.ndarray:
        """Images -> [n, size, size, channels] uint8, as the model sees them before normalisation."""
        arrays = [image_array(x, self.pre, f"image {i}") for i, x in enumerate(_items(images))]
        return _stack(arrays, self.pre)

    def features(self, arrays: np.ndarray) -> torch.Tensor:
        """[n, size, size, channels] uint8 -> backbone features [n, d] float32 (eval mode), as meta-test computes them."""
        import numpy as np

        from metatransfer.data.store import ImageStore
        from metatransfer.train.evaluate import extract_features

        store = ImageStore.from_offsets(arrays, np.array([0, len(arrays)]), ["images"], "predict")
        return extract_features(self.model.backbone, store, self.runtime, self.pre.mean, self.pre.std)

    def fit(self, images: Images, labels: Sequence[Hashable]) -> FewShotLearner:
        """Learn the classes of a support set: `images` with their `labels` (any hashable, e.g. names).

        Classes are the sorted distinct labels (at least 2); the support is put in a canonical order
        (by class, then by pixel content) first, so the result does not depend on the order given.
        Returns self.
        """
        import torch

        arrays = self.to_arrays(images)
        labels = list(labels)
        if len(labels) != len(arrays):
            raise UserError(
                f"fit got {len(arrays)} images but {len(labels)} labels; give one label per image"
            )
        classes = _sorted_classes(labels)
        if len(classes) < 2:
            raise UserError(
                f"fit needs support images of at least 2 classes, got {len(classes)} ({classes}); add another class"
            )
        index = {c: i for i, c in enumerate(classes)}
        y = [index[label] for label in labels]
        order = sorted(range(len(y)), key=lambda i: (y[i], hashlib.sha1(arrays[i].tobytes()).digest()))
        self._support = (self.features(arrays[order]), torch.tensor([y[i] for i in order]))
        self.classes = classes
        return self

    def probabilities(self, arrays: np.ndarray) -> np.ndarray:
        """[n, size, size, channels] uint8 (see `to_arrays`) -> class probabilities [n, len(classes)] float32."""
        import numpy as np
        import torch

        from metatransfer.models.meta_learner import inner_loop
        from metatransfer.train.evaluate import classify

        if self._support is None:
            raise UserError("call fit(support_images, support_labels) before predicting")
        way = len(self.classes)
        if len(arrays) == 0:
            return np.zeros((0, way), dtype=np.float32)
        xs, ys = self._support
        xq = self.features(arrays)
        with torch.no_grad():
            loop = inner_loop(self.meta, test=True)
            scores = classify(xs[None], ys[None], xq[None], way, "linear", loop, self.model.frozen_init(way))
            return torch.softmax(scores[0], dim=-1).numpy()

    def predict_proba(self, images: Images) -> np.ndarray:
        """Softmax of the adapted classifier's logits: [n, len(classes)], columns in `self.classes` order."""
        return self.probabilities(self.to_arrays(images))

    def predict(self, images: Images) -> list[Hashable]:
        """The most probable class (a label given to `fit`) of each image."""
        return [self.classes[int(i)] for i in self.predict_proba(images).argmax(1)]


def load(
    model: str | os.PathLike[str], *, device: str = "cpu", precision: str | None = None
) -> FewShotLearner:
    """A `FewShotLearner` from an exported `.mtl` file, a meta-train run directory or its model.safetensors.

    `device`: "cpu" (default), "cuda", "cuda:N" or "auto". `precision`: None (default) uses the model's
    own setting, as `mtl meta-test` does (the run's config, usually "auto": bf16 on CPUs with native
    bf16, else fp32), so predictions match meta-test's; "fp32" gives the same numbers on every machine;
    or "auto", "bf16", "fp16" (CUDA).
    """
    from metatransfer.card import build_card, card_from_metadata
    from metatransfer.config import CHOICES, Config
    from metatransfer.device import resolve_runtime
    from metatransfer.models.meta_learner import MODEL_FILE, load_meta_model
    from metatransfer.runs import load_weights

    path = Path(model)
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.exists():
            raise UserError(
                f"{path.parent} holds no {MODEL_FILE}; pass a meta-train run directory or a .mtl file"
            )
    tensors, info = load_weights(path)
    if info.get("format") == EXPORT_FORMAT:
        learner, pre, meta = _from_export(path, tensors, info)
        card = card_from_metadata(info)
    else:
        learner, pre, meta = load_meta_model(path)
        card = build_card(path)
    precision = precision or _recorded_precision(path, info)
    if precision not in CHOICES["precision"]:
        raise UserError(
            f"precision {precision!r} is not valid; choose one of: {', '.join(CHOICES['precision'])}"
        )
    runtime = resolve_runtime(Config(device=device, precision=precision))
    runtime.model(learner)
    return FewShotLearner(learner, pre, meta, runtime, card)


def _recorded_precision(model_file: Path, info: dict[str, str]) -> str:
    """The precision meta-test runs this model with: an export's record, else its run's config.yaml, else auto."""
    from metatransfer.config import load_config
    from metatransfer.runs import CONFIG_FILE

    if "precision" in info:
        return info["precision"]
    config = model_file.parent / CONFIG_FILE
    return load_config(config).precision if config.is_file() else "auto"


def _from_export(
    path: Path, tensors: dict[str, torch.Tensor], info: dict[str, str]
) -> tuple[MetaLearner, Preprocess, MetaConfig]:
    """Rebuild an exported model: the plain backbone, with a bias on each conv the export folded SS into."""
    import torch
    from torch import nn

    from metatransfer.config import MetaConfig
    from metatransfer.models.backbones import create_backbone
    from metatransfer.models.meta_learner import MetaLearner
    from metatransfer.train.common import Preprocess

    version = int(info.get("format_version", "0"))
    if version > EXPORT_VERSION:
        raise UserError(
            f"{path} is format version {version}; this metatransfer reads up to {EXPORT_VERSION}, upgrade it"
        )
    try:
        meta = MetaConfig(**json.loads(info["meta"]))
        pre = Preprocess.from_json(info["preprocess"])
        backbone = create_backbone(info["backbone"], pre.channels, **json.loads(info["backbone_args"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} has malformed metatransfer metadata ({exc}); export it again") from exc
    for name, module in backbone.named_modules():
        # The plain architecture's convs have no bias (BN follows); folded SS ones carry b + shift.
        if isinstance(module, nn.Conv2d) and module.bias is None and f"backbone.{name}.bias" in tensors:
            module.bias = nn.Parameter(torch.zeros(module.out_channels))
    learner = MetaLearner(
        backbone, tensors["theta_weight"].shape[0] if "theta_weight" in tensors else meta.way
    )
    try:
        learner.load_state_dict(tensors)
    except RuntimeError as exc:
        raise UserError(
            f"{path} does not match backbone {info['backbone']}: {str(exc).splitlines()[0]}"
        ) from exc
    return learner.eval(), pre, meta


def export_model(
    run: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a meta-train run's model (the run directory or its model.safetensors) as one portable file.

    Tensors: the MetaLearner's state with every SS conv folded into a plain conv with bias
    (`fold_ss`), and theta. Metadata: the run's (backbone, backbone_args, preprocess, meta, ...) plus
    `format`/`format_version`, the run's `precision` and the model `card`. An existing `out` is replaced
    only with `overwrite`, and never when it is one of a run's own files. Returns the written path.
    """
    from metatransfer.card import CARD_KEY, build_card, now_iso
    from metatransfer.models.meta_learner import MODEL_FILE, load_meta_model
    from metatransfer.models.scale_shift import fold_ss
    from metatransfer.runs import load_weights, run_file_owner, save_weights

    source = Path(run)
    if source.is_dir():
        source = source / MODEL_FILE
    if not source.is_file():
        raise UserError(f"no meta-trained model at {source}; pass a meta-train run directory")
    out = Path(out)
    _check_export_target(out, overwrite, run_file_owner(out))
    learner, _, _ = load_meta_model(source)
    _, info = load_weights(source)
    metadata = {
        **info,
        "format": EXPORT_FORMAT,
        "format_version": str(EXPORT_VERSION),
        "precision": _recorded_precision(source, info),
        CARD_KEY: json.dumps(build_card(source, created=now_iso())),
    }
    # Not recorded as a run file: `--overwrite` of a run it was written into leaves the export alone.
    save_weights(out, fold_ss(learner).state_dict(), metadata, record=False)
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
    from metatransfer.data.readers.base import IMAGE_EXTENSIONS

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
    import numpy as np

    from metatransfer.data.readers.base import class_folders_split

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


def cmd_predict(args: argparse.Namespace) -> int:
    """`mtl predict`: exit 0, or 1 when some query images could not be read (they are listed)."""
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    queries = query_files(args.query)
    learner = load(args.model, device=args.device, precision=args.precision)
    results = predict_folder(learner, args.support, queries, args.top_k)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(format_table(results))
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"mtl: {failed} of {len(results)} query images could not be read", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    path = export_model(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"exported: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `predict` and `export` on `mtl`'s sub-command parser."""
    p = sub.add_parser("predict", help="classify your images after learning new classes from a few examples")
    p.add_argument("model", help="exported .mtl file or meta-train run directory")
    p.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    p.add_argument(
        "--query", required=True, nargs="+", metavar="PATH", help="image files or folders (recursive)"
    )
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="default: the model's own, as mtl meta-test uses (auto: bf16 on CPUs with native bf16)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a meta-trained model as one portable .mtl file")
    p.add_argument("run_dir", help="meta-train run directory (or its model.safetensors)")
    p.add_argument("--out", required=True, help="output file, e.g. model.mtl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)

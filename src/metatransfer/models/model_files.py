"""Model files: the one place that writes and reads every model we save, and validates what it reads.

Three kinds, all safetensors with string metadata:

- a backbone (`backbone.safetensors`, phase 1): the backbone's weights;
- a meta model (`model.safetensors`, phase 2): a `MetaLearner` (backbone in SS form, plus theta), with
  the `meta` settings it was trained with;
- an export (`.mtl`, `mtl export`): a meta model with SS folded into plain convolutions, marked with
  `format` / `format_version` and the precision meta-test used.

Metadata (every value a string): `backbone` (registry name), `backbone_args` (JSON object),
`preprocess` (JSON, see `Preprocess`), `dataset`; a meta model adds `meta` (JSON of `MetaConfig`
without `ht`); extra keys (`epoch`, `tasks`, ...) are kept as they are.

Loading never trusts the file: the metadata is checked against its schema and types (the meta settings
and the backbone's widths against the same ranges as the config), the model is first built on torch's
"meta" device (no memory) and its parameter shapes compared with the file's tensors, so an absurd
width is refused before anything is allocated; then the tensors must be finite. Every problem is one
line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from metatransfer.config import Config, MetaConfig, meta_config, short
from metatransfer.data.preprocess import Preprocess
from metatransfer.errors import ModelFileError, UserError
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, prepare_backbone
from metatransfer.models.scale_shift import drop_dead_shifts
from metatransfer.runs import load_weights, save_weights

BACKBONE_FILE = "backbone.safetensors"  # a pre-training run's kept backbone
MODEL_FILE = "model.safetensors"  # a meta-train run's kept model: the best on val (the start included)
EXPORT_FORMAT = "metatransfer-model"  # metadata "format" of an exported file
EXPORT_VERSION = 1  # bump when the exported layout changes; loading refuses newer versions

Kind = Literal["backbone", "meta", "export"]


@dataclass
class ModelFile:
    """A validated model file: `module` is the backbone (kind "backbone") or a `MetaLearner`, in eval mode."""

    path: Path
    kind: Kind
    module: nn.Module
    pre: Preprocess
    meta: MetaConfig | None  # None for a backbone
    info: dict[str, str]  # the file's metadata as stored


# --- writing ---------------------------------------------------------------------------------------------


def model_metadata(
    cfg: Config, pre: Preprocess, meta: MetaConfig | None, extra: Mapping[str, str]
) -> dict[str, str]:
    """The metadata every model file carries: how to rebuild the backbone and feed it (plus `meta`)."""
    info = {
        "backbone": cfg.model.backbone,
        "backbone_args": json.dumps(cfg.model.backbone_args),
        "preprocess": pre.to_json(),
        "dataset": cfg.data.dataset,
    }
    if meta is not None:
        info["meta"] = json.dumps({k: v for k, v in vars(meta).items() if k != "ht"})
    return {**info, **extra}


def build_backbone(cfg: Config, in_channels: int) -> nn.Module:
    return create_backbone(cfg.model.backbone, in_channels, **cfg.model.backbone_args)


def save_backbone(path: Path, backbone: nn.Module, cfg: Config, pre: Preprocess, **extra: str) -> None:
    """Backbone weights as safetensors, with what is needed to rebuild and feed it in the metadata."""
    save_weights(path, backbone.state_dict(), model_metadata(cfg, pre, None, extra))


def save_meta_model(path: Path, learner: MetaLearner, cfg: Config, pre: Preprocess, **extra: str) -> None:
    save_weights(path, learner.state_dict(), model_metadata(cfg, pre, cfg.meta, extra))


def export_metadata(info: dict[str, str], precision: str, storage: str = "fp32") -> dict[str, str]:
    """A meta model's metadata marked as an export (`format`, `format_version`) with its meta-test precision
    and the float type its tensors are stored in (`storage`: fp32, or fp16 to halve the file)."""
    marks = {"format": EXPORT_FORMAT, "format_version": str(EXPORT_VERSION), "precision": precision}
    return {**info, **marks, "storage": storage}


# --- reading ---------------------------------------------------------------------------------------------


def read_model_file(path: str | Path) -> ModelFile:
    """Load and validate any model file (kind from its metadata); ModelFileError naming it otherwise."""
    path = Path(path)
    tensors, info = load_weights(path)
    kind: Kind = "export" if "format" in info else "meta" if "meta" in info else "backbone"
    try:
        return _rebuild(path, kind, tensors, info)
    except ModelFileError:
        raise
    except UserError as exc:  # a config-style check (a range, a backbone option) failed on the metadata
        raise ModelFileError(f"{path}: {exc}") from exc


def load_backbone(path: Path) -> tuple[nn.Module, Preprocess, dict[str, str]]:
    """A phase-1 backbone file: (backbone in eval mode, preprocessing, metadata)."""
    f = read_model_file(path)
    if f.kind != "backbone":
        raise ModelFileError(
            f"{path} is a meta-trained model, not a pre-trained backbone; pass the pretrain run"
        )
    return f.module, f.pre, f.info


def load_meta_model(path: Path) -> tuple[MetaLearner, Preprocess, MetaConfig]:
    """A meta-train run's model file (or an export): (learner in eval mode, preprocessing, meta settings)."""
    f = read_model_file(path)
    if f.kind == "backbone" or f.meta is None or not isinstance(f.module, MetaLearner):
        raise ModelFileError(
            f"{path} is not a meta-trained model (no 'meta' metadata); pass a meta-train run directory"
        )
    return f.module, f.pre, f.meta


def _field(path: Path, info: dict[str, str], key: str) -> str:
    if key not in info:
        raise ModelFileError(f"{path} lacks the metadata '{key}'; was it written by metatransfer?")
    return info[key]


def _json(path: Path, info: dict[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(_field(path, info, key))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: metadata '{key}' is not valid JSON ({exc.msg})") from exc
    if not isinstance(value, kind):
        raise ModelFileError(f"{path}: metadata '{key}' must be a JSON {kind.__name__}, got {short(value)}")
    return value


def _check_version(path: Path, info: dict[str, str]) -> None:
    if info["format"] != EXPORT_FORMAT:
        raise ModelFileError(f"{path}: unknown format {short(info['format'])} (expected {EXPORT_FORMAT})")
    text = info.get("format_version", "")
    if not text.isdigit() or int(text) < 1:
        raise ModelFileError(f"{path}: format_version must be a positive integer, got {short(text)}")
    if int(text) > EXPORT_VERSION:
        raise ModelFileError(
            f"{path} is format version {text}; this metatransfer reads up to {EXPORT_VERSION}, upgrade it"
        )


def _rebuild(path: Path, kind: Kind, tensors: dict[str, torch.Tensor], info: dict[str, str]) -> ModelFile:
    if kind == "export":
        _check_version(path, info)
        tensors = _from_storage(path, tensors, info)
    try:
        pre = Preprocess.from_json(_field(path, info, "preprocess"))
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: metadata 'preprocess' is invalid ({short(str(exc), 120)})") from exc
    name = _field(path, info, "backbone")
    args = _json(path, info, "backbone_args", dict)
    meta = meta_config(_json(path, info, "meta", dict), str(path)) if kind != "backbone" else None
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated for an absurd width
            skeleton = _assemble(kind, create_backbone(name, pre.channels, **args), meta, tensors)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: cannot build its model ({short(str(exc), 120)})") from exc
    if kind == "meta":  # files from before bn "batch" dropped the SS shifts it removes
        tensors = drop_dead_shifts(skeleton, tensors)
    _check_tensors(path, skeleton, tensors)
    module = _assemble(kind, create_backbone(name, pre.channels, **args), meta, tensors)
    module.load_state_dict(tensors)
    return ModelFile(path, kind, module.eval(), pre, meta, info)


def _from_storage(
    path: Path, tensors: dict[str, torch.Tensor], info: dict[str, str]
) -> dict[str, torch.Tensor]:
    """An export stored in fp16 (metadata `storage`, see `export_metadata`) -> its fp32 tensors; the
    model always computes in fp32 (or its runtime's autocast), only the file is halved."""
    storage = info.get("storage", "fp32")
    if storage == "fp32":
        return tensors
    if storage != "fp16":
        raise ModelFileError(f"{path}: metadata 'storage' is {short(storage)}; expected fp32 or fp16")
    return {k: t.float() if t.dtype == torch.float16 else t for k, t in tensors.items()}


def _assemble(
    kind: Kind, backbone: nn.Module, meta: MetaConfig | None, tensors: dict[str, torch.Tensor]
) -> nn.Module:
    """The module a file of `kind` holds, around a freshly built `backbone`."""
    if kind == "backbone":
        return backbone
    assert meta is not None
    if kind == "meta":
        prepare_backbone(backbone, meta)
    else:
        for name, module in backbone.named_modules():
            # The plain architecture's convs have no bias (BN follows); folded SS ones carry b + shift.
            if isinstance(module, nn.Conv2d) and module.bias is None and f"backbone.{name}.bias" in tensors:
                module.bias = nn.Parameter(torch.zeros(module.out_channels))
    return MetaLearner(backbone, meta.way)


def _check_tensors(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The file's tensors must be exactly `model`'s state: same names, shapes and dtypes, all finite."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelFileError(
            f"{path} does not match its metadata's model ({what}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors)"
        )
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ModelFileError(
                f"{path}: tensor {key} is {list(got.shape)} {got.dtype}, the model needs "
                f"{list(want.shape)} {want.dtype}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ModelFileError(f"{path}: tensor {key} holds NaN or infinite values; the model is unusable")

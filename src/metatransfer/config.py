"""Typed run configuration: dataclass defaults, YAML files on top, `--set key=value` overrides last.

Every value is checked against its declared type when it is set, so a typo in a config file or on the
command line fails at start-up with the key's dotted name, not hours into a run. The resolved config
is saved as `config.yaml` beside a run's outputs and can be loaded back with `load_config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from metatransfer.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "glyphs"  # reader name, see `mtl datasets`
    root: str | None = None  # dataset folder (or a parent holding it; --data-root sets this)
    scheme: str | None = None  # omniglot: "vinyals" (1028/172/423) or "lake" (964/659)
    rotations: bool = False  # omniglot vinyals: 90-degree rotations as extra classes (x4)
    size: int = 28  # images are resized once to size x size when the cache is built
    cache_dir: str | None = None  # default: $MTL_CACHE_DIR or ~/.cache/metatransfer
    on_bad_image: str = "fail"  # "fail" or "skip" (with a warning naming each file)
    workers: int = 0  # decode workers for building the cache (0 = all cores)


@dataclass
class ModelConfig:
    backbone: str = "resnet12"  # registry name: conv4, resnet12, resnet25
    backbone_args: dict[str, Any] = field(default_factory=dict)  # e.g. {widths: [64, 160, 320, 640]}


@dataclass
class AugmentConfig:
    enabled: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # random-resized-crop area range
    flip: bool = True
    color_jitter: float = 0.4  # brightness/contrast/saturation strength (RGB only)


@dataclass
class PretrainConfig:
    """Phase 1: supervised training of backbone + linear classifier on all train-split classes."""

    epochs: int = 30
    batch_size: int = 128
    images_per_epoch: int | None = None  # None = the whole train split each epoch
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" or "step"
    step_size: int = 10  # epochs between decays ("step")
    gamma: float = 0.1  # decay factor ("step")
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    head: str = "linear"  # "linear" (paper) or "cosine" (normalised features and weights, learned scale)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_episodes: int = 200  # fixed 5-way val episodes per epoch, nearest class mean (cosine)
    val_shots: list[int] = field(default_factory=lambda: [1, 5])


@dataclass
class HTConfig:
    """Hard-task meta-batches (the paper's HT): re-learn tasks made of the failure classes."""

    enabled: bool = False
    tasks_per_batch: int = 1  # hard tasks built after each meta-batch
    start_after: int = 0  # ordinary tasks seen before hard tasks begin


@dataclass
class MetaConfig:
    """Phase 2: meta-transfer learning of the SS parameters Phi and the classifier initialisation theta."""

    method: str = "mtl"  # mtl (SS all layers), ss-last, ft-last, ft-theta; see `mtl ablate`
    way: int = 5
    shot: int = 1
    query: int = 15
    meta_batch: int = 2  # tasks per outer update
    tasks: int = 2000  # ordinary meta-training tasks in total
    inner_steps: int = 20  # base-learner steps per task while meta-training
    inner_steps_test: int = 50  # base-learner steps per task at meta-test
    inner_lr: float = 0.1  # beta
    lr_ss: float = 1e-3  # gamma_1, for Phi (scale and shift)
    lr_theta: float = 1e-4  # gamma_2, for theta's initialisation (small: rows are exchangeable, see README)
    lr_decay: float = 0.5
    lr_decay_every: int = 1000  # tasks
    first_order: bool = True  # the original code's first-order outer gradient; False = exact
    # BatchNorm in meta-training: "frozen" (phase-1 statistics and affine), "train" (phase-1 statistics,
    # affine meta-learned), "batch" (batch statistics and affine meta-learned, as the original code;
    # running statistics keep updating, and meta-test uses them).
    bn: str = "frozen"
    ss_granularity: str = "filter"  # "filter" (paper) or "kernel" (original PyTorch code)
    normalize_features: bool = True  # L2-normalise features before the linear base learner
    # Where each task's classifier starts: "zero" (theta alone, the paper) or "proto" (theta plus the
    # support set's nearest-class-mean classifier, Proto-MAML: step 0 is NCM, the inner loop refines it).
    classifier_init: str = "zero"
    temperature: float = 10.0  # logit scale for normalised features
    augment: bool = False
    val_every: int = 500  # tasks between validations
    val_episodes: int = 200
    ht: HTConfig = field(default_factory=HTConfig)


@dataclass
class EvalConfig:
    split: str = "test"
    ways: list[int] = field(default_factory=lambda: [5])
    shots: list[int] = field(default_factory=lambda: [1, 5])
    query: int = 15
    episodes: int = 600
    seed: int = 0  # reported episodes depend only on this seed (not on the training seed)
    # Episodes that choose anything (pre-training epoch, meta checkpoint, update-theta's grid, sweeps)
    # come from this other seed, so no reported number is computed on episodes that selected it.
    selection_seed: int = 1


@dataclass
class LoggingConfig:
    """What a run writes for people to look at, besides metrics.csv and curves.png."""

    tensorboard: bool = (
        False  # TensorBoard scalars in each run directory (pip install 'metatransfer[tensorboard]')
    )


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 on CPUs with bf16, fp16 AMP on CUDA), "fp32", "bf16", "fp16"
    channels_last: bool = True
    threads: int = 0  # torch intra-op threads on CPU (0 = leave torch's default)
    # torch.compile the backbone's meta-training forward+backward: fuses SS, BatchNorm and activations
    # (about 1.5x more tasks/s for ResNet-12 at 84 px on a CPU) for a one-time cost of about a minute.
    # Needs a C++ compiler on CPU; if compiling fails the run warns once and goes on uncompiled.
    compile: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Values a string option may take; checked after every load so a typo fails at start-up.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_bad_image": ("fail", "skip"),
    "pretrain.schedule": ("cosine", "step"),
    "pretrain.head": ("linear", "cosine"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "meta.method": ("mtl", "ss-last", "ft-last", "ft-theta"),
    "meta.bn": ("frozen", "train", "batch"),
    "meta.classifier_init": ("zero", "proto"),
    "meta.ss_granularity": ("filter", "kernel"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked (and, for int -> float, widened) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' expects a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    # bool is an int subclass: keep them apart so `epochs: true` or `enabled: 1` is refused.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys here: {', '.join(prefix + n for n in names)})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `meta.way=20` into (["meta", "way"], 20); the value is parsed as YAML (`[1,5]`, `true`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. meta.way=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(allowed)}")


def build_config(layers: Iterable[Mapping[str, Any]] = (), overrides: Iterable[str] = ()) -> Config:
    """Defaults, then each mapping in `layers` (e.g. parsed YAML files), then `key=value` overrides."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    for text in overrides:
        path, value = parse_override(text)
        merged = _merge(merged, _nest(path, value))
    cfg: Config = _build(Config, merged)
    _check_choices(cfg)
    if cfg.eval.selection_seed == cfg.eval.seed:
        raise ConfigError(
            f"eval.selection_seed and eval.seed are both {cfg.eval.seed}: the episodes that choose a model "
            "must differ from the reported ones; give them different seeds"
        )
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config file safely (no Python objects), naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a config file (or only defaults when `path` is None) and apply `key=value` overrides."""
    return build_config([read_yaml(path)] if path is not None else [], overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

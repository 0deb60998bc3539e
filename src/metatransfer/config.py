"""Typed run configuration: dataclass defaults, YAML files on top, `--set key=value` overrides last.

Every key declares its type and, for numbers, its allowed range in one place: its annotation here
(`Annotated[int, Range(1, 10_000)]`, `Literal["fail", "skip"]`). The loader checks each value against
it when the config is built, so a typo or an impossible value fails at start-up with the key's dotted
name, not hours into a run. The resolved config is saved as `config.yaml` beside a run's outputs and
can be loaded back with `load_config`.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from metatransfer.errors import ConfigError

# String options: each one's allowed values are written only here. Code that needs them at run time
# (argument parsers, readers) reads them with `choices(...)`.
Split = Literal["train", "val", "test"]
OmniglotScheme = Literal["vinyals", "lake"]
OnBadImage = Literal["fail", "skip"]
Schedule = Literal["cosine", "step"]
Head = Literal["linear", "cosine"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Method = Literal["mtl", "ss-last", "ft-last", "ft-theta"]
SS_METHODS: tuple[Method, ...] = ("mtl", "ss-last")  # the methods that put SS convolutions on the backbone
BatchNormMode = Literal["frozen", "train", "batch"]
ClassifierInit = Literal["zero", "proto"]
Granularity = Literal["filter", "kernel"]
Phase = Literal["pretrain", "meta"]

SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds


def choices(option: Any) -> tuple[str, ...]:
    """The allowed values of a `Literal[...]` option, e.g. `choices(Precision)`."""
    return tuple(typing.get_args(option))


_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlevel = 2


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: error messages never print a whole (possibly huge) value."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in, declared next to its key: `Annotated[float, Range(0, 1, low_open=True)]`.

    NaN lies in no range, and every range is finite, so inf and absurd values are refused too.
    """

    low: float
    high: float
    low_open: bool = False  # low itself excluded (e.g. a learning rate > 0)
    high_open: bool = False

    def check(self, key: str, value: Any) -> None:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if not (above and below):  # also False for NaN
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            raise ConfigError(
                f"{_label(key)} must be in {lo}{_num(self.low)}, {_num(self.high)}{hi}, got {short(value)}"
            )


@dataclass(frozen=True)
class Length:
    """How many items a list key holds: `Annotated[list[int], Length(1, 16)]`."""

    low: int
    high: int

    def check(self, key: str, value: Any) -> None:
        if not self.low <= len(value) <= self.high:
            n = f"{self.low}" if self.low == self.high else f"{self.low} to {self.high}"
            raise ConfigError(f"{_label(key)} needs {n} values, got {len(value)}: {short(value)}")


@dataclass(frozen=True)
class Ascending:
    """A list whose items must not decrease (e.g. a (min, max) pair)."""

    def check(self, key: str, value: Any) -> None:
        if any(a > b for a, b in zip(value, value[1:], strict=False)):
            raise ConfigError(f"{_label(key)} must be in increasing order (min first), got {short(value)}")


def _label(key: str) -> str:
    """How a message names `key`: a config key ("config key 'meta.way'") or a CLI argument ("--episodes")."""
    return f"argument {key}" if key.startswith("-") else f"config key '{key}'"


def check_value(value: Any, tp: Any, name: str) -> Any:
    """`value` checked against the annotation `tp` (type, choices, range) as the config loader does;
    `name` is a config key or a CLI argument ("--episodes") for the message."""
    return _coerce(value, tp, name)


def _num(x: float) -> str:
    return f"{x:,}".replace(",", "_") if isinstance(x, int) and abs(x) >= 10_000 else f"{x:g}"


# Shorthands for the ranges most keys use.
Count = Annotated[int, Range(1, 1_000_000_000)]  # at least one (tasks, episodes, steps between events)
Seed = Annotated[int, Range(0, SEED_MAX)]
Shot = Annotated[int, Range(1, 10_000)]
Way = Annotated[int, Range(2, 10_000)]
LearningRate = Annotated[float, Range(0, 100, low_open=True)]
Temperature = Annotated[float, Range(0, 10_000, low_open=True)]
InnerSteps = Annotated[int, Range(0, 100_000)]  # 0 is allowed: with classifier_init proto it is plain NCM
Fraction = Annotated[float, Range(0, 1)]
ImageSize = Annotated[int, Range(1, 4096)]  # pixels; each backbone also has a minimum (checked with the data)
Workers = Annotated[int, Range(0, 1024)]  # decode threads (0 = all cores)


@dataclass
class DataConfig:
    dataset: str = "glyphs"  # reader name, see `mtl datasets`
    root: str | None = None  # dataset folder (or a parent holding it; --data-root sets this)
    scheme: OmniglotScheme | None = None  # omniglot: "vinyals" (1028/172/423) or "lake" (964/659)
    rotations: bool = False  # omniglot vinyals: 90-degree rotations as extra classes (x4)
    # images are resized once to size x size when the cache is built (each backbone has a minimum)
    size: ImageSize = 28
    cache_dir: str | None = None  # default: $MTL_CACHE_DIR or ~/.cache/metatransfer
    on_bad_image: OnBadImage = "fail"  # "fail" or "skip" (with a warning naming each file)
    workers: Workers = 0  # decode workers for building the cache (0 = all cores)


@dataclass
class ModelConfig:
    backbone: str = "resnet12"  # registry name: conv4, resnet12, resnet25
    backbone_args: dict[str, Any] = field(default_factory=dict)  # e.g. {widths: [64, 160, 320, 640]}


@dataclass
class AugmentConfig:
    enabled: bool = True  # augment pre-training batches (random-resized crop, flip, colour jitter)
    # random-resized-crop area range (min, max), fractions of the image
    crop_scale: Annotated[list[Annotated[float, Range(0, 1, low_open=True)]], Length(2, 2), Ascending()] = (
        field(default_factory=lambda: [0.35, 1.0])
    )
    flip: bool = True  # random horizontal flip
    # brightness/contrast/saturation strength (RGB only): factors in [1 - x, 1 + x]
    color_jitter: Annotated[float, Range(0, 1, high_open=True)] = 0.4


@dataclass
class PretrainConfig:
    """Phase 1: supervised training of backbone + linear classifier on all train-split classes."""

    epochs: Annotated[int, Range(1, 100_000)] = 30  # passes over the train split (or images_per_epoch)
    batch_size: Annotated[int, Range(1, 65_536)] = 128  # images per SGD step
    images_per_epoch: Count | None = None  # None = the whole train split each epoch
    lr: LearningRate = 0.1  # SGD learning rate at the start of the schedule
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: Fraction = 5e-4  # L2 penalty of SGD
    schedule: Schedule = "cosine"  # "cosine" or "step"
    step_size: Annotated[int, Range(1, 100_000)] = 10  # epochs between decays ("step")
    gamma: Annotated[float, Range(0, 1, low_open=True)] = 0.1  # decay factor ("step")
    warmup_epochs: Annotated[int, Range(0, 100_000)] = 0  # epochs of linear learning-rate warm-up
    label_smoothing: Annotated[float, Range(0, 1, high_open=True)] = 0.0  # of the cross-entropy targets
    head: Head = "linear"  # "linear" (paper) or "cosine" (normalised features and weights, learned scale)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_episodes: Count = 200  # fixed 5-way val episodes per epoch, nearest class mean (cosine)
    # shots of the per-epoch val episodes
    val_shots: Annotated[list[Shot], Length(1, 16)] = field(default_factory=lambda: [1, 5])


@dataclass
class HTConfig:
    """Hard-task meta-batches (the paper's HT): re-learn tasks made of the failure classes."""

    enabled: bool = False  # add hard tasks to meta-training
    tasks_per_batch: Annotated[int, Range(1, 10_000)] = 1  # hard tasks built after each meta-batch
    start_after: Annotated[int, Range(0, 1_000_000_000)] = 0  # ordinary tasks seen before hard tasks begin
    # 1: after each meta-batch, hard tasks of its own failure classes, hardest first. k > 1 (the paper's
    # algorithm): failure classes pooled over k meta-batches, then tasks_per_batch * k hard tasks, each of
    # `way` classes drawn at random from the pool (topped up with the next-hardest when it holds fewer).
    pool_batches: Annotated[int, Range(1, 10_000)] = 1


@dataclass
class MetaConfig:
    """Phase 2: meta-transfer learning of the SS parameters Phi and the classifier initialisation theta."""

    method: Method = "mtl"  # mtl (SS all layers), ss-last, ft-last, ft-theta; see `mtl ablate`
    way: Way = 5  # classes per meta-training task
    shot: Shot = 1  # support images per class in meta-training (and meta-test's default)
    query: Shot = 15  # query images per class in meta-training
    meta_batch: Annotated[int, Range(1, 4096)] = 2  # tasks per outer update
    tasks: Count = 2000  # ordinary meta-training tasks in total
    inner_steps: InnerSteps = 20  # base-learner steps per task while meta-training
    inner_steps_test: InnerSteps = 50  # base-learner steps per task at meta-test
    inner_lr: LearningRate = 0.1  # beta
    lr_ss: Annotated[float, Range(0, 100)] = 1e-3  # gamma_1, for Phi (scale and shift); 0 freezes Phi
    # gamma_2, for theta's initialisation (small: rows are exchangeable, see README); 0 freezes theta
    lr_theta: Annotated[float, Range(0, 100)] = 1e-4
    # factor on lr_ss and lr_theta every lr_decay_every tasks
    lr_decay: Annotated[float, Range(0, 1, low_open=True)] = 0.5
    lr_decay_every: Count = 1000  # tasks
    first_order: bool = True  # the original code's first-order outer gradient; False = exact
    # BatchNorm in meta-training: "frozen" (phase-1 statistics and affine), "train" (phase-1 statistics,
    # affine meta-learned), "batch" (batch statistics and affine meta-learned, as the original code;
    # running statistics keep updating, and meta-test uses them). With "batch" the convs feeding BN get
    # no SS shift (BN subtracts it) and a per-filter scale is refused (BN divides it out).
    bn: BatchNormMode = "frozen"
    # bn "batch": after meta-training, re-estimate the kept model's BN running statistics as plain
    # averages over this many batches of train-split images, without augmentation ("precise BN"); 0 = off
    bn_recalibrate: Annotated[int, Range(0, 1_000_000)] = 0
    ss_granularity: Granularity = "filter"  # "filter" (paper) or "kernel" (original PyTorch code)
    normalize_features: bool = True  # L2-normalise features before the linear base learner
    # Where each task's classifier starts: "zero" (theta alone, the paper) or "proto" (theta plus the
    # support set's nearest-class-mean classifier, Proto-MAML: step 0 is NCM, the inner loop refines it).
    classifier_init: ClassifierInit = "zero"
    temperature: Temperature = 10.0  # logit scale for normalised features
    augment: bool = False  # augment the support and query images of meta-training tasks
    val_every: Count = 500  # tasks between validations
    # val episodes per validation (selection seed), which choose the kept checkpoint
    val_episodes: Count = 200
    ht: HTConfig = field(default_factory=HTConfig)


@dataclass
class EvalConfig:
    split: Split = "test"  # split of the reported episodes (and of meta-test and compare by default)
    ways: Annotated[list[Way], Length(1, 16)] = field(default_factory=lambda: [5])  # ways reported by mtl run
    # shots reported by mtl run (one meta-training per shot)
    shots: Annotated[list[Shot], Length(1, 16)] = field(default_factory=lambda: [1, 5])
    query: Shot = 15  # query images per class in reported episodes
    episodes: Count = 600  # reported episodes per setting (the 95% CI shrinks as 1/sqrt(episodes))
    seed: Seed = 0  # reported episodes depend only on this seed (not on the training seed)
    # Episodes that choose anything (pre-training epoch, meta checkpoint, update-theta's grid, sweeps)
    # come from this other seed, so no reported number is computed on episodes that selected it.
    selection_seed: Seed = 1


@dataclass
class LoggingConfig:
    """What a run writes for people to look at, besides metrics.csv and curves.png."""

    tensorboard: bool = (
        False  # TensorBoard scalars in each run directory (pip install 'metatransfer[tensorboard]')
    )


@dataclass
class Config:
    name: str = "run"  # names the default output folder, runs/<name>/<phase>
    seed: Seed = 0  # training randomness (initialisation, batches, tasks); episodes use eval.seed
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: Precision = "auto"  # "auto" (bf16 on CPUs with bf16, fp16 AMP on CUDA), "fp32", "bf16", "fp16"
    channels_last: bool = True  # NHWC memory format for convolutions (faster on CPU and recent GPUs)
    threads: Annotated[int, Range(0, 4096)] = 0  # torch intra-op threads on CPU (0 = leave torch's default)
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


def _unannotated(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """`Annotated[T, *checks]` -> (T, checks); any other type -> (tp, ())."""
    if typing.get_origin(tp) is Annotated:
        base, *checks = typing.get_args(tp)
        return base, tuple(checks)
    return tp, ()


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked (and, for int -> float, widened) against the annotation `tp`.

    `Annotated[T, check, ...]`: the value is coerced to T, then each check (`Range`, `Length`, ...) runs.
    """
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, checks = _unannotated(tp)
        value = _coerce(value, base, key)
        for check in checks:
            check.check(key, value)
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(f"{_label(key)} is {short(value)}; choose one of {', '.join(allowed)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            base, checks = _unannotated(arg)
            try:
                value_as_arg = _coerce(value, base, key)
            except ConfigError:
                continue
            for check in checks:  # the type fits: its range decides, with its own message
                check.check(key, value_as_arg)
            return value_as_arg
        raise ConfigError(f"{_label(key)} expects {_type_name(tp)}, got {short(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{_label(key)} expects a list, got {short(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_label(key)} expects a mapping, got {short(value)}")
        return dict(value)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_label(key)} expects a mapping of {tp.__name__} fields, got {short(value)}")
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
            try:
                return float(value)
            except OverflowError:  # an int too large for a float: its range refuses it
                return float("inf")
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{_label(key)} expects {_type_name(tp)}, got {short(value)} ({type(value).__name__})")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, values)) - set(names))
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 40 else unknown[0][:37] + "..."
        raise ConfigError(
            f"unknown config key '{prefix}{name}' (known keys here: {', '.join(prefix + n for n in names)})"
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


# Limits on what a config file or override may expand to: a YAML alias "bomb" (anchors of anchors)
# is refused quickly instead of exhausting memory while the value is walked.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 32


# libyaml's safe loader when PyYAML has it (same types as yaml.SafeLoader, about 10x faster).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_load(text: str, where: str) -> Any:
    """Parse YAML safely (no Python objects), bounded in size, expanded node count and depth."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} is {len(text)} characters; a config is at most {MAX_YAML_BYTES}")
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where} nests deeper than {MAX_YAML_DEPTH} levels") from exc
    _check_expanded_size(data, where)
    return data


def _check_expanded_size(data: Any, where: str) -> None:
    """Count the nodes `data` expands to (aliases count every time), stopping at the limit."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(
                f"{where} expands to more than {MAX_YAML_NODES} values (YAML aliases?); refusing to read it"
            )
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where} nests deeper than {MAX_YAML_DEPTH} levels")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `meta.way=20` into (["meta", "way"], 20); the value is parsed as YAML (`[1,5]`, `true`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"override '{short(text)}' must look like key=value, e.g. meta.way=20")
    key, raw = text.split("=", 1)
    value = _yaml_load(raw, f"override '{short(text)}'") if raw.strip() else ""
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def build_config(layers: Iterable[Mapping[str, Any]] = (), overrides: Iterable[str] = ()) -> Config:
    """Defaults, then each mapping in `layers` (e.g. parsed YAML files), then `key=value` overrides.

    Every value is checked against its key's declared type and range (see the module docstring).
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    for text in overrides:
        path, value = parse_override(text)
        merged = _merge(merged, _nest(path, value))
    cfg: Config = _build(Config, merged)
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: Config) -> None:
    """Rules between keys (each key's own range is in its annotation)."""
    if cfg.eval.selection_seed == cfg.eval.seed:
        raise ConfigError(
            f"eval.selection_seed and eval.seed are both {cfg.eval.seed}: the episodes that choose a model "
            "must differ from the reported ones; give them different seeds"
        )
    if cfg.pretrain.nesterov and cfg.pretrain.momentum == 0:
        raise ConfigError(
            "config key 'pretrain.momentum' is 0, but pretrain.nesterov needs momentum; "
            "raise it or set pretrain.nesterov: false"
        )
    m = cfg.meta
    if m.bn == "batch" and m.ss_granularity == "filter" and m.method in SS_METHODS:
        raise ConfigError(
            "meta.ss_granularity 'filter' with meta.bn 'batch' would learn nothing: BN's batch statistics "
            "divide out a per-filter scale; use ss_granularity: kernel, or bn: frozen or train"
        )
    if m.bn_recalibrate and m.bn != "batch":
        raise ConfigError(
            f"meta.bn_recalibrate re-estimates the statistics of meta.bn 'batch'; with bn '{m.bn}' meta-training "
            "used the phase-1 statistics, so set bn_recalibrate: 0"
        )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config file safely (no Python objects, bounded size), naming the file on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (bad byte at offset {exc.start})") from exc
    data = _yaml_load(text, f"config file {p}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a config file (or only defaults when `path` is None) and apply `key=value` overrides."""
    return build_config([read_yaml(path)] if path is not None else [], overrides)


def meta_config(values: Mapping[str, Any], where: str) -> MetaConfig:
    """A `MetaConfig` from a mapping (e.g. a model file's metadata), checked like the config's `meta` section."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: meta settings must be a mapping, got {short(values)}")
    meta: MetaConfig = _build(MetaConfig, values, prefix="meta.")
    return meta


def numeric_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every key whose value is a number or a list of numbers, with its annotation: ("meta.way", Way), ...

    Walks the dataclasses, so a key added to them is listed (and so covered by the property test).
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base = tp
        while typing.get_origin(base) is Annotated:
            base = typing.get_args(base)[0]
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            yield from numeric_keys(base, f"{prefix}{f.name}.")
        elif _is_numeric(base):
            yield f"{prefix}{f.name}", tp


def _is_numeric(tp: Any) -> bool:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType, list):
        return any(_is_numeric(a) for a in typing.get_args(tp) if a is not type(None))
    return tp in (int, float)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def phase_inputs(cfg: Config, phase: Phase) -> Config:
    """`cfg` with the settings that `phase` never reads reset to their defaults: two configs with the same
    view give the same result in that phase. A finished run is reused, and an unfinished one resumed, when
    only later settings changed: a new `meta` section keeps the pre-trained backbone, a new `eval` section
    keeps both phases, and `logging` never counts."""
    # Of `eval`, training reads only the val episodes it selects on (pretrain also their query size).
    val = EvalConfig(selection_seed=cfg.eval.selection_seed)
    if phase == "pretrain":
        val = dataclasses.replace(val, query=cfg.eval.query)
        return dataclasses.replace(cfg, meta=MetaConfig(), eval=val, logging=LoggingConfig())
    return dataclasses.replace(cfg, eval=val, logging=LoggingConfig())

"""Feature extractors Θ for few-shot learning, in a registry.

Every backbone maps images ``[B, C, H, W]`` to flat features ``[B, out_dim]``. All end with global
average pooling, so no input size is baked in (28, 32 and 84 px all work). Each backbone exposes its
residual/conv stages as ``stages: nn.ModuleList``; ``scale_shift.last_stage_prefix`` relies on it to
find "the last stage" for SS or fine-tuning of the last block only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import Tensor, nn

from metatransfer.config import short
from metatransfer.errors import ConfigError

__all__ = [
    "BACKBONES",
    "Backbone",
    "backbone_options",
    "Conv4",
    "ResNet12",
    "ResNet25",
    "create_backbone",
    "register_backbone",
]


class Backbone(nn.Module):
    """Base class: ``stem`` -> each of ``stages`` -> global average pool -> flatten.

    Attributes:
        out_dim: length of the feature vector returned by ``forward``.
        in_channels: number of image channels expected (1 grayscale, 3 RGB).
        stages: the stages in forward order; the last one is "the last stage" of the paper's ablation.
        min_size: smallest input side (pixels) that still leaves a non-empty feature map.
    """

    out_dim: int
    in_channels: int
    stages: nn.ModuleList
    min_size: int = 1

    def __init__(self, in_channels: int, stem: nn.Module, stages: Sequence[nn.Module], out_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = out_dim
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, in_channels, H, W]`` (any memory format) -> features ``[B, out_dim]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images [B, {self.in_channels}, H, W], got {list(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"{type(self).__name__} needs images of at least {self.min_size} px, got "
                f"{x.shape[-2]}x{x.shape[-1]}; raise the data size"
            )
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        # flatten (not .view) so channels_last feature maps need no contiguous copy first.
        return self.pool(x).flatten(1)


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions; BatchNorm starts as the identity (weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, whose shift makes a conv bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """1x1 conv + BN shortcut that matches the residual branch's channels and stride."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


# The widest layer any backbone may have: far above every published width (640), and small enough that a
# config or model file asking for more (a typo, or a hostile file) is refused before anything is built.
MAX_WIDTH = 16_384


def _is_positive_int(value: object, high: int = MAX_WIDTH) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= high


def _check_widths(backbone: str, widths: Sequence[int], count: int) -> tuple[int, ...]:
    """Validate a config's ``widths`` (list or tuple) and return it as a tuple of ints."""
    if (
        isinstance(widths, str)
        or not isinstance(widths, Sequence)
        or len(widths) != count
        or not all(_is_positive_int(w) for w in widths)
    ):
        raise ConfigError(
            f"backbone '{backbone}': widths must be {count} integers in [1, {MAX_WIDTH}], got {short(widths)}"
        )
    return tuple(widths)


def _check_positive_int(backbone: str, key: str, value: int) -> None:
    if not _is_positive_int(value):
        raise ConfigError(
            f"backbone '{backbone}': {key} must be an integer in [1, {MAX_WIDTH}], got {short(value)}"
        )


def _check_probability(backbone: str, key: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ConfigError(f"backbone '{backbone}': {key} must be in [0, 1), got {short(value)}")


B = TypeVar("B", bound=type[Backbone])

BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(name: str) -> Callable[[B], B]:
    """Class decorator: make a ``Backbone`` subclass available as ``create_backbone(name, ...)``.

    The class's ``__init__`` must take ``in_channels`` first; its other keyword arguments become the
    backbone's config options.
    """

    def decorate(cls: B) -> B:
        if name in BACKBONES:
            raise ValueError(f"backbone name '{name}' is already registered by {BACKBONES[name].__name__}")
        BACKBONES[name] = cls
        return cls

    return decorate


def backbone_options(name: str) -> list[str]:
    """The keyword options ``create_backbone(name, in_channels, **options)`` accepts, sorted."""
    params = inspect.signature(_lookup(name)).parameters
    return sorted(p for p in params if p != "in_channels")


def _lookup(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def create_backbone(name: str, in_channels: int, **kwargs: object) -> Backbone:
    """Build the registered backbone ``name`` for ``in_channels``-channel images.

    Raises ``ConfigError`` for an unknown name, an unknown option (the message lists the allowed ones)
    or an invalid option value.
    """
    cls = _lookup(name)
    allowed = backbone_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"backbone '{name}' has no option {', '.join(repr(k) for k in unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    _check_positive_int(name, "in_channels", in_channels)
    build: Callable[..., Backbone] = cls  # subclasses take their own options, not Backbone's arguments
    return build(in_channels, **kwargs)


@register_backbone("conv4")
class Conv4(Backbone):
    """Four blocks of conv3x3-BN-ReLU-maxpool2 (the ProtoNet/MAML "Conv-4"), ``hidden`` channels each.

    ``out_dim = hidden``; needs inputs of at least 16 px (four halvings).
    """

    min_size = 16

    def __init__(self, in_channels: int, hidden: int = 64) -> None:
        _check_positive_int("conv4", "hidden", hidden)
        blocks = [
            nn.Sequential(
                _conv3x3(cin, hidden), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            )
            for cin in (in_channels, hidden, hidden, hidden)
        ]
        super().__init__(in_channels, nn.Identity(), blocks, hidden)


class ResNet12Block(nn.Module):
    """Three conv3x3-BN (LeakyReLU between), plus a 1x1 conv-BN shortcut, LeakyReLU, 2x2 max-pool.

    ``[B, cin, H, W] -> [B, cout, H // 2, W // 2]``.
    """

    def __init__(self, in_channels: int, out_channels: int, slope: float, dropout: float) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels)
        self.act = nn.LeakyReLU(slope, inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.dropout(self.pool(out))


@register_backbone("resnet12")
class ResNet12(Backbone):
    """The standard few-shot ResNet-12 (MetaOptNet / FEAT / MTL TensorFlow code): four ``ResNet12Block``.

    ``out_dim = widths[-1]``; needs inputs of at least 16 px. ``dropout`` is applied after each
    block's pooling (0 disables it); ``slope`` is the LeakyReLU negative slope.
    """

    min_size = 16

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = (64, 160, 320, 640),
        dropout: float = 0.0,
        slope: float = 0.1,
    ) -> None:
        widths = _check_widths("resnet12", widths, 4)
        _check_probability("resnet12", "dropout", dropout)
        if isinstance(slope, bool) or not isinstance(slope, int | float) or not 0 <= slope <= 1:
            raise ConfigError(f"backbone 'resnet12': slope must be in [0, 1], got {short(slope)}")
        ins = (in_channels, *widths[:-1])
        blocks = [ResNet12Block(cin, cout, slope, dropout) for cin, cout in zip(ins, widths, strict=True)]
        super().__init__(in_channels, nn.Identity(), blocks, widths[-1])


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus shortcut, ReLU.

    The shortcut is a 1x1 conv-BN projection when the stride or channel count changes, else identity.
    ``[B, cin, H, W] -> [B, cout, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            _projection(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


@register_backbone("resnet25")
class ResNet25(Backbone):
    """The wider ResNet of the original MTL PyTorch code (25 weighted 3x3 conv layers).

    Stem conv3x3-BN-ReLU with ``widths[0] // 2`` channels, then three stages of four ``BasicBlock``;
    the first block of each stage has stride 2. ``out_dim = widths[-1]``. The original ends with a
    fixed 10x10 average pool (80 px inputs); here the pool is adaptive so any size works.
    """

    blocks_per_stage = 4

    def __init__(self, in_channels: int, widths: Sequence[int] = (160, 320, 640)) -> None:
        widths = _check_widths("resnet25", widths, 3)
        stem_width = max(1, widths[0] // 2)
        stem = nn.Sequential(
            _conv3x3(in_channels, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        )
        stages = []
        cin = stem_width
        for width in widths:
            blocks = [BasicBlock(cin, width, stride=2)]
            blocks += [BasicBlock(width, width, stride=1) for _ in range(self.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        super().__init__(in_channels, stem, stages, widths[-1])

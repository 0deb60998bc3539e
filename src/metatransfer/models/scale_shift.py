"""Scale-and-shift (SS) convolutions: MTL's neuron-level adaptation of a frozen pre-trained network.

Each selected convolution ``W X + b`` becomes ``(W ⊙ Φ_S1) X + (b + Φ_S2)``: W and b are frozen
(stored as buffers, so they never appear in ``parameters()``), the scale Φ_S1 starts at 1 and the
shift Φ_S2 (one per output channel) at 0, so a freshly converted network computes exactly what the
pre-trained one did. Φ are ordinary ``nn.Parameter``s, so ``torch.func.functional_call`` can swap
them for fast weights in an inner loop.

A conv whose output feeds a BatchNorm that normalises with its batch's statistics gets no shift: BN
subtracts the batch mean, so the shift would be removed exactly and never learn (its gradient is
rounding noise). A BN with fixed running statistics keeps it, since there the shift acts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metatransfer.config import Granularity
from metatransfer.errors import ConfigError

__all__ = [
    "Layers",
    "SSConv2d",
    "convert_to_ss",
    "count_trainable",
    "describe_trainable",
    "drop_dead_shifts",
    "fold_ss",
    "last_stage_prefix",
    "ss_parameters",
]

# Granularity "filter": one scale per output filter, as in the paper; "kernel": one per (output, input)
# kernel pair, as in the original MTL PyTorch code. Layers: "all" convs, or the backbone's "last" stage.
Layers = Literal["all", "last"]
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _low_precision(x: Tensor) -> bool:
    """Whether convolutions of `x` run under bf16/fp16 autocast."""
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.float32


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d size attribute (always a 2-tuple for nn.Conv2d) typed as such."""
    return (values[0], values[1])


class SSConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` with a learnable scale Φ_S1 and shift Φ_S2.

    Buffers: ``weight`` ``[out, in/groups, kh, kw]`` and ``bias`` ``[out]`` (zeros when the wrapped conv
    had none, so the shift always has somewhere to go). Parameters: ``scale`` ``[out, 1, 1, 1]``
    (granularity "filter") or ``[out, in/groups, 1, 1]`` ("kernel"), initialised to 1; ``shift``
    ``[out]``, initialised to 0, or None when ``shift=False`` (the conv feeds a batch-statistics BN).
    ``forward``: ``[B, in, H, W] -> [B, out, H', W']`` like the conv.
    """

    weight: Tensor
    bias: Tensor
    shift: nn.Parameter | None

    def __init__(self, conv: nn.Conv2d, granularity: Granularity = "filter", shift: bool = True) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"SSConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.granularity = granularity
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride = _pair(conv.stride)
        self.padding: str | tuple[int, int] = (
            conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        )
        self.dilation = _pair(conv.dilation)
        self.groups = conv.groups
        weight = conv.weight.detach().clone()  # clone keeps the memory format (e.g. channels_last)
        bias = conv.bias.detach().clone() if conv.bias is not None else weight.new_zeros(self.out_channels)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        scale_shape = (self.out_channels, 1 if granularity == "filter" else weight.shape[1], 1, 1)
        self.scale = nn.Parameter(weight.new_ones(scale_shape))
        self.register_parameter("shift", nn.Parameter(weight.new_zeros(self.out_channels)) if shift else None)

    def effective_weight(self) -> Tensor:
        """``W ⊙ Φ_S1``, ``[out, in/groups, kh, kw]``."""
        return self.weight * self.scale

    def effective_bias(self) -> Tensor:
        """``b + Φ_S2`` (``b`` without a shift), ``[out]``."""
        return self.bias if self.shift is None else self.bias + self.shift

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        # Under bf16/fp16 autocast the scale and shift act in fp32 and the output is fp32: a meta-learned
        # s = 1.003 rounds to 1.0 in bf16, and so does y * 1.003 for any bf16 y, which would hide every
        # Adam step of Phi until about 0.4% had accumulated.
        low = _low_precision(x)
        if self.granularity == "filter" and (low or (self.scale.requires_grad and torch.is_grad_enabled())):
            # conv(x, W * s) == conv(x, W) * s for a per-filter s. With the frozen W outside the graph,
            # backward skips the weight-gradient convolution (about a third of the training FLOPs);
            # the scale's gradient is then a cheap reduction over the conv output.
            y = self._conv(x, self.weight)
            bias = self.effective_bias().view(1, -1, 1, 1)
            if low:
                return torch.addcmul(bias, y.float(), self.scale.view(1, -1, 1, 1))
            return torch.addcmul(bias.to(y.dtype), y, self.scale.view(1, -1, 1, 1).to(y.dtype))
        if low:
            # Per-kernel scale: W * s would be rounded to W's low-precision grid, so the change is a
            # second convolution with W * (s - 1), which keeps its digits, summed in fp32.
            y = self._conv(x, self.weight, self.effective_bias()).float()
            return y + self._conv(x, self.weight * (self.scale - 1)).float()
        # fp32: scaling the (small) weight tensor keeps the cost at one conv.
        return self._conv(x, self.effective_weight(), self.effective_bias())

    def to_conv(self) -> nn.Conv2d:
        """An ordinary ``nn.Conv2d`` (with bias) computing the same function, for inference."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight = nn.Parameter(self.effective_weight().detach().clone())
            conv.bias = nn.Parameter(self.effective_bias().detach().clone())
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"granularity={self.granularity!r}" + ("" if self.shift is not None else ", shift=False")
        )


def last_stage_prefix(model: nn.Module) -> str:
    """Module-name prefix of the last stage of the backbone inside ``model``, e.g. ``"encoder.stages.3"``.

    The backbone is the (single) submodule, or ``model`` itself, with a ``stages: nn.ModuleList``
    attribute, as every backbone in ``metatransfer.models.backbones`` has.
    """
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "stages", None), nn.ModuleList) and len(module.stages) > 0
    ]
    if not found:
        raise ConfigError(
            f"layers='last' needs a backbone with a 'stages' list (conv4, resnet12, resnet25); "
            f"{type(model).__name__} has none; use layers='all'"
        )
    if len(found) > 1:
        raise ValueError(f"model holds several backbones ({', '.join(found)}); 'last stage' is ambiguous")
    owner = found[0]
    stages = model.get_submodule(owner).stages
    assert isinstance(stages, nn.ModuleList)
    return f"{owner}.stages.{len(stages) - 1}" if owner else f"stages.{len(stages) - 1}"


def _in_scope(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or lies inside it (``""`` selects everything)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _batch_norm_after(model: nn.Module) -> dict[str, str]:
    """Conv name -> name of the BatchNorm that normalises its output.

    Read from module order: a conv's output feeds the BN registered right after it over as many
    channels, as every backbone in ``metatransfer.models.backbones`` builds its conv-BN pairs
    (test_models_scale_shift checks this against the forward pass).
    """
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    pairs = {}
    for (name, conv), (bn_name, bn) in zip(leaves, leaves[1:], strict=False):
        if (
            isinstance(conv, nn.Conv2d | SSConv2d)
            and isinstance(bn, _BATCH_NORMS)
            and bn.num_features == conv.out_channels
        ):
            pairs[name] = bn_name
    return pairs


def convert_to_ss(
    model: nn.Module,
    *,
    layers: Layers = "all",
    granularity: Granularity = "filter",
    train_bn: bool = False,
    batch_stats: bool = False,
) -> nn.Module:
    """Turn ``model`` into its SS form, in place, and return it.

    Every ``nn.Conv2d`` (1x1 shortcuts included) in the selected layers (``"all"``, or ``"last"``: the
    backbone's last stage, see ``last_stage_prefix``) becomes an ``SSConv2d`` of the given
    ``granularity``; with ``batch_stats`` (BN will normalise with batch statistics, ``meta.bn: batch``)
    those that feed a BN get no shift. Then every parameter is frozen except the SS scales/shifts and, if ``train_bn``,
    the BatchNorm affine parameters inside the selected layers. Anything else that should train (e.g. a
    classifier head inside ``model``) must be unfrozen by the caller afterwards. BatchNorm running
    statistics are buffers: put BN in eval mode to keep them fixed.
    """
    if any(isinstance(m, SSConv2d) for m in model.modules()):
        raise ValueError("model already contains SSConv2d layers; convert a fresh copy of the backbone")
    if isinstance(model, nn.Conv2d):
        raise ValueError("convert_to_ss needs a container module; wrap a single conv in SSConv2d directly")
    prefix = last_stage_prefix(model) if layers == "last" else ""
    selected = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and _in_scope(name, prefix)
    ]
    feeds_bn = _batch_norm_after(model) if batch_stats else {}
    for name in selected:
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        model.set_submodule(name, SSConv2d(conv, granularity, shift=name not in feeds_bn))
    for name, module in model.named_modules():
        trainable = isinstance(module, SSConv2d) or (
            train_bn and isinstance(module, _BATCH_NORMS) and _in_scope(name, prefix)
        )
        for param in module.parameters(recurse=False):
            param.requires_grad_(trainable)
    return model


def fold_ss(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with each ``SSConv2d`` replaced by an equivalent ``nn.Conv2d``.

    The folded convs hold ``W ⊙ Φ_S1`` and ``b + Φ_S2`` as ordinary (trainable) parameters, so inference
    costs exactly what the original network did. ``model`` itself is left untouched.
    """
    if isinstance(model, SSConv2d):
        return model.to_conv()
    folded = copy.deepcopy(model)
    names = [name for name, module in folded.named_modules() if isinstance(module, SSConv2d)]
    for name in names:
        ss = folded.get_submodule(name)
        assert isinstance(ss, SSConv2d)
        folded.set_submodule(name, ss.to_conv())
    return folded


def drop_dead_shifts(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of ``model`` saved before dead shifts were dropped (it holds a ``.shift`` for convs
    of ``model`` that have none), made loadable: each such shift goes into the running mean of the BN
    it feeds, ``BN(y + s) = BN'(y)`` with ``mean' = mean - s``, so outputs with running statistics (meta-test,
    predict) are unchanged; under batch statistics the shift never mattered."""
    out = dict(state)
    for conv, bn in _batch_norm_after(model).items():
        module = model.get_submodule(conv)
        shift, mean = f"{conv}.shift", f"{bn}.running_mean"
        # Anything else (a shape that does not fit) stays, for the caller's check to name.
        if (
            isinstance(module, SSConv2d)
            and module.shift is None
            and shift in out
            and mean in out
            and out[shift].shape == out[mean].shape
        ):
            out[mean] = out[mean] - out.pop(shift).to(out[mean].dtype)
    return out


def ss_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The SS parameters of ``model`` in module order: for each ``SSConv2d``, its scale then its shift
    (if it has one)."""
    return [
        p for m in model.modules() if isinstance(m, SSConv2d) for p in (m.scale, m.shift) if p is not None
    ]


def count_trainable(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` with ``requires_grad`` (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_trainable(model: nn.Module) -> str:
    """One-line summary, e.g. ``"trainable: 9,600 of 12,426,560 parameters (SS scale 4,800, SS shift
    4,800, BN 0)"``. The total includes the frozen SS weights and biases (buffers)."""
    scale = shift = bn = frozen_ss = 0
    for module in model.modules():
        if isinstance(module, SSConv2d):
            scale += module.scale.numel() if module.scale.requires_grad else 0
            shift += module.shift.numel() if module.shift is not None and module.shift.requires_grad else 0
            frozen_ss += module.weight.numel() + module.bias.numel()
        elif isinstance(module, _BATCH_NORMS):
            bn += sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    trainable = count_trainable(model)
    total = sum(p.numel() for p in model.parameters()) + frozen_ss
    other = trainable - scale - shift - bn
    parts = f"SS scale {scale:,}, SS shift {shift:,}, BN {bn:,}" + (f", other {other:,}" if other else "")
    return f"trainable: {trainable:,} of {total:,} parameters ({parts})"

"""Scale-and-shift: identity after conversion, gradient flow, trainable counts, folding, exact values."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.config import MetaConfig
from metatransfer.errors import ConfigError
from metatransfer.models import (
    SSConv2d,
    convert_to_ss,
    count_trainable,
    create_backbone,
    describe_trainable,
    fold_ss,
    ss_parameters,
)
from metatransfer.models.meta_learner import prepare_backbone

TINY: dict[str, dict[str, object]] = {
    "conv4": {"hidden": 8},
    "resnet12": {"widths": (4, 6, 8, 10)},
    "resnet25": {"widths": (4, 6, 8)},
}


def pretrained(name: str, seed: int = 0) -> nn.Module:
    """A tiny backbone with random weights and non-trivial BN statistics/affine, in eval mode."""
    torch.manual_seed(seed)
    net = create_backbone(name, 3, **TINY[name])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return net.eval()


def randomise_ss(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ss_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 4 else 0.0))


def images(size: int = 32, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("layers", ["all", "last"])
def test_conversion_keeps_outputs(name: str, granularity: str, layers: str) -> None:
    net = pretrained(name)
    x = images()
    with torch.no_grad():
        ref = net(x)
        out = convert_to_ss(copy.deepcopy(net), layers=layers, granularity=granularity).eval()(x)
    assert (out - ref).abs().max().item() <= 1e-6


def test_all_converts_every_conv_and_last_only_the_last_stage() -> None:
    net = convert_to_ss(pretrained("resnet12"))
    assert not any(type(m) is nn.Conv2d for m in net.modules())
    assert sum(isinstance(m, SSConv2d) for m in net.modules()) == 16  # 4 blocks x (3 convs + shortcut)
    last = convert_to_ss(pretrained("resnet12"), layers="last")
    ss_names = [n for n, m in last.named_modules() if isinstance(m, SSConv2d)]
    assert ss_names == [f"stages.3.{c}" for c in ("conv1", "conv2", "conv3", "shortcut.0")]


@pytest.mark.parametrize("train_bn", [False, True])
@pytest.mark.parametrize("layers", ["all", "last"])
def test_gradients_reach_only_ss_and_optionally_bn(layers: str, train_bn: bool) -> None:
    net = convert_to_ss(pretrained("resnet12"), layers=layers, train_bn=train_bn).train()
    net(images()).square().mean().backward()
    ss_modules = [m for m in net.modules() if isinstance(m, SSConv2d)]
    for m in ss_modules:
        assert m.weight.grad is None and m.bias.grad is None
        assert not m.weight.requires_grad and not m.bias.requires_grad
        assert m.scale.grad is not None and m.scale.grad.abs().sum() > 0
        assert m.shift.grad is not None and m.shift.grad.abs().sum() > 0
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            in_scope = layers == "all" or name.startswith("stages.3.")
            for p in (m.weight, m.bias):
                assert p.requires_grad == (train_bn and in_scope)
                assert (p.grad is not None) == (train_bn and in_scope)
        elif isinstance(m, nn.Conv2d):  # unconverted convs outside the last stage stay frozen
            assert not m.weight.requires_grad and m.weight.grad is None
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    allowed = {id(p) for p in ss_parameters(net)}
    if train_bn:
        allowed |= {id(p) for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert trainable <= allowed and {id(p) for p in ss_parameters(net)} <= trainable


def test_trainable_count_of_a_tiny_conv4_by_hand() -> None:
    # conv4, 3 input channels, hidden 4: convs 3->4, 4->4, 4->4, 4->4 (3x3, no bias), 4 BNs of 4 channels.
    weights = 4 * 3 * 9 + 3 * (4 * 4 * 9)  # 108 + 432 = 540 frozen conv weights
    bn = 4 * (4 + 4)  # 32 BN affine parameters
    filter_ss = 4 * (4 + 4)  # per conv: 4 scales + 4 shifts
    kernel_ss = (4 * 3 + 4) + 3 * (4 * 4 + 4)  # per conv: out*in scales + out shifts = 16 + 60 = 76

    def tiny(**kwargs: object) -> nn.Module:
        return convert_to_ss(create_backbone("conv4", 3, hidden=4), **kwargs)  # type: ignore[arg-type]

    assert count_trainable(tiny()) == filter_ss == 32
    assert count_trainable(tiny(granularity="kernel")) == kernel_ss == 76
    assert count_trainable(tiny(train_bn=True)) == filter_ss + bn == 64
    # the last stage is one conv 4->4 and one BN: 4 + 4 SS, plus 8 BN affine
    assert count_trainable(tiny(layers="last", train_bn=True)) == 8 + 8
    total = weights + bn + filter_ss  # frozen conv weights + zero biases (4 per conv) also count
    assert describe_trainable(tiny()) == (
        f"trainable: 32 of {total + 16:,} parameters (SS scale 16, SS shift 16, BN 0)"
    )
    head = nn.Sequential(tiny(train_bn=True), nn.Linear(4, 5))
    assert describe_trainable(head).endswith("(SS scale 16, SS shift 16, BN 32, other 25)")


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_folding_gives_the_same_outputs(name: str, granularity: str) -> None:
    ss = convert_to_ss(pretrained(name), granularity=granularity).eval()
    randomise_ss(ss)
    folded = fold_ss(ss).eval()
    assert not any(isinstance(m, SSConv2d) for m in folded.modules())
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert any(isinstance(m, SSConv2d) for m in ss.modules())  # the original is untouched
    x = images()
    with torch.no_grad():
        assert (folded(x) - ss(x)).abs().max().item() <= 1e-5


def test_single_filter_by_hand() -> None:
    conv = nn.Conv2d(1, 1, 1, bias=True)
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(0.5)
    ss = SSConv2d(conv)
    assert ss.scale.shape == (1, 1, 1, 1) and ss.shift.shape == (1,)
    with torch.no_grad():
        ss.scale.fill_(3.0)
        ss.shift.fill_(-0.25)
    x = torch.full((1, 1, 1, 1), 1.5)
    # (W * scale) x + (b + shift) = (2 * 3) * 1.5 + (0.5 - 0.25) = 9.25, exact in fp32
    assert ss(x).item() == 9.25
    assert fold_ss(ss)(x).item() == 9.25


def test_kernel_granularity_by_hand() -> None:
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1))
    ss = SSConv2d(conv, granularity="kernel")
    assert ss.scale.shape == (1, 2, 1, 1)
    assert torch.equal(ss.bias, torch.zeros(1))  # no bias -> zeros, so the shift still applies
    with torch.no_grad():
        ss.scale.copy_(torch.tensor([3.0, 0.5]).view(1, 2, 1, 1))
        ss.shift.fill_(1.0)
    x = torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    # 2*3*1 + (-1*0.5)*4 + (0 + 1) = 6 - 2 + 1 = 5
    assert ss(x).item() == 5.0


def test_frozen_weights_are_buffers_saved_in_the_state_dict() -> None:
    ss = convert_to_ss(create_backbone("conv4", 3, hidden=4))
    for m in ss.modules():
        if isinstance(m, SSConv2d):
            assert {n for n, _ in m.named_parameters()} == {"scale", "shift"}
            assert {n for n, _ in m.named_buffers()} == {"weight", "bias"}
    state = ss.state_dict()
    assert {"stages.0.0.weight", "stages.0.0.bias", "stages.0.0.scale", "stages.0.0.shift"} <= set(state)


def test_functional_call_swaps_in_fast_weights() -> None:
    net = convert_to_ss(pretrained("conv4")).eval()
    x = images()
    fast = {n: p.detach() * 1.5 if n.endswith("scale") else p for n, p in net.named_parameters()}
    with torch.no_grad():
        out = torch.func.functional_call(net, fast, (x,))
        for p in net.parameters():
            if p.dim() == 4:
                p.mul_(1.5)
        torch.testing.assert_close(out, net(x))

    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}

    def loss(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(net, ps, (x,)).square().mean()

    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params) and all(g.abs().sum() > 0 for g in grads.values())


def test_bf16_autocast_and_channels_last() -> None:
    net = convert_to_ss(pretrained("resnet12"), train_bn=True).eval()
    randomise_ss(net)
    x = images()
    with torch.no_grad():
        ref = net(x)
    net = net.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fold_ss(net)(x_cl), ref, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x_cl)
    # The convs ran in bf16; SS scales and shifts in fp32, so the features come out fp32.
    assert low.dtype == torch.float32
    # bf16 keeps ~3 significant digits; a few percent of the feature scale is what it can promise here.
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    net.train()  # last: train mode updates the BN running statistics
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x_cl).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ss_parameters(net))
    assert all(p.grad.abs().sum() > 0 for p in ss_parameters(net) if p.grad is not None)


def test_last_stage_needs_stages_and_no_double_conversion() -> None:
    net = create_backbone("conv4", 3, hidden=4)
    with pytest.raises(ConfigError, match="layers='last' needs a backbone"):
        convert_to_ss(nn.Sequential(nn.Conv2d(3, 4, 3)), layers="last")
    convert_to_ss(net)
    with pytest.raises(ValueError, match="already contains SSConv2d"):
        convert_to_ss(net)


def test_training_path_scales_outputs_like_the_weight_path() -> None:
    """With a scale gradient the filter-wise SS conv scales its output (cheaper backward); values and
    gradients must equal those of the weight-scaled conv."""
    torch.manual_seed(0)
    ss = SSConv2d(nn.Conv2d(3, 5, 3, padding=1, bias=True), "filter")
    with torch.no_grad():
        ss.scale.uniform_(0.5, 1.5)
        ss.shift.normal_()
    x = torch.randn(2, 3, 7, 7)
    y_train = ss(x)
    with torch.no_grad():
        y_eval = ss(x)
    torch.testing.assert_close(y_train, y_eval, atol=1e-5, rtol=1e-5)
    (y_train**2).sum().backward()
    grad_scale = ss.scale.grad.clone()
    scale = ss.scale.detach().clone().requires_grad_(True)
    reference = F.conv2d(x, ss.weight * scale, ss.bias + ss.shift.detach(), padding=1)
    (reference**2).sum().backward()
    torch.testing.assert_close(grad_scale, scale.grad, atol=1e-4, rtol=1e-5)
    assert ss.weight.grad is None


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("grad", [True, False])
def test_small_scale_changes_stay_visible_under_bf16(granularity: str, grad: bool) -> None:
    # A scale of 1 + 2^-10 is below bf16's resolution around 1 (2^-8): W * s rounds back to W. The bf16
    # forward must still move by about what the fp32 forward moves (the SS change is kept apart from W).
    torch.manual_seed(0)
    ss = SSConv2d(nn.Conv2d(8, 8, 3, padding=1, bias=False), granularity)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(grad):
        before = ss(x).float()
        with torch.no_grad():
            ss.scale.add_(2.0**-10)
        after = ss(x).float()
    with torch.no_grad():
        expected = F.conv2d(x, ss.weight * (ss.scale - 1), padding=1)  # fp32 change
    moved = after - before
    assert moved.abs().mean() > 0.5 * expected.abs().mean()
    torch.testing.assert_close(moved, expected, atol=0.02 * float(expected.abs().max()), rtol=0.1)


def _convs_feeding_batch_norm(net: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the convs whose output tensor is a BatchNorm's input, found by running `net` (dataflow,
    not module order)."""
    produced: dict[int, str] = {}
    outputs: list[torch.Tensor] = []  # kept alive, so no id is reused during the forward
    fed: set[str] = set()

    def conv_hook(name: str) -> object:
        def hook(module: nn.Module, inputs: object, out: torch.Tensor) -> None:
            outputs.append(out)
            produced[id(out)] = name

        return hook

    def bn_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if id(inputs[0]) in produced:
            fed.add(produced[id(inputs[0])])

    handles = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d | SSConv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))  # type: ignore[arg-type]
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return fed


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("bn", ["frozen", "train", "batch"])
@pytest.mark.parametrize("method", ["mtl", "ss-last"])
def test_no_shift_feeds_a_batch_statistics_bn(name: str, bn: str, method: str) -> None:
    # A BN that normalises with its batch's statistics subtracts the batch mean, so a shift before it
    # is removed exactly: it gets no parameter. Frozen or train-mode BN (running statistics) keeps it.
    net = pretrained(name)
    prepare_backbone(net, MetaConfig(method=method, bn=bn, ss_granularity="kernel"))  # type: ignore[arg-type]
    fed = _convs_feeding_batch_norm(net.eval(), images())
    converted = {n: m for n, m in net.named_modules() if isinstance(m, SSConv2d)}
    assert converted and set(converted) <= fed  # every conv of these backbones feeds a BN
    for n, m in converted.items():
        assert (m.shift is None) == (bn == "batch"), n
    shifts = [n for n, p in net.named_parameters() if n.endswith("shift") and p.requires_grad]
    assert (not shifts) if bn == "batch" else len(shifts) == len(converted)
    if bn == "batch":
        assert "SS shift 0," in describe_trainable(net)


def test_a_batch_statistics_bn_makes_the_shift_dead() -> None:
    # Why the shift goes: in train mode BN's output does not depend on it at all.
    net = convert_to_ss(pretrained("conv4")).train()
    x = images()
    before = net(x)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, SSConv2d):
                assert m.shift is not None
                m.shift.normal_()
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)

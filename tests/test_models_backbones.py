"""Backbone registry: construction, output shapes at 28/32/84 px, and config errors."""

from __future__ import annotations

import pytest
import torch

from metatransfer.errors import ConfigError
from metatransfer.models import BACKBONES, Backbone, backbone_options, create_backbone, last_stage_prefix

# Tiny widths keep every test well under a second on 2 cores.
TINY: dict[str, dict[str, object]] = {
    "conv4": {"hidden": 8},
    "resnet12": {"widths": (4, 6, 8, 10)},
    "resnet25": {"widths": (4, 6, 8)},
}


def test_registry_has_the_three_backbones() -> None:
    assert set(BACKBONES) >= {"conv4", "resnet12", "resnet25"}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("size", [28, 32, 84])
@pytest.mark.parametrize("channels", [1, 3])
def test_flat_features_at_each_size(name: str, size: int, channels: int) -> None:
    net = create_backbone(name, channels, **TINY[name]).eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert isinstance(net, Backbone)
    assert out.shape == (2, net.out_dim)
    assert torch.isfinite(out).all()


def test_out_dim_follows_widths() -> None:
    assert create_backbone("conv4", 3, hidden=8).out_dim == 8
    assert create_backbone("resnet12", 3, widths=[4, 6, 8, 10]).out_dim == 10
    assert create_backbone("resnet25", 3, widths=[4, 6, 12]).out_dim == 12


def test_default_resnet12_is_the_standard_one() -> None:
    net = create_backbone("resnet12", 3)
    assert net.out_dim == 640
    # 3x3 convs: per block 9*(cin*c + 2*c*c); 1x1 shortcuts: cin*c; BN: 2*c per each of 4 BNs.
    widths, ins = (64, 160, 320, 640), (3, 64, 160, 320)
    expected = sum(9 * (i * c + 2 * c * c) + i * c + 8 * c for i, c in zip(ins, widths, strict=True))
    assert sum(p.numel() for p in net.parameters()) == expected
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is None for c in convs)
    leaky = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.1 for m in leaky)


def test_resnet25_has_25_weighted_3x3_layers() -> None:
    net = create_backbone("resnet25", 3, **TINY["resnet25"])
    convs3 = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 25


def test_channels_last_input_gives_same_features() -> None:
    net = create_backbone("resnet12", 3, **TINY["resnet12"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode() -> None:
    net = create_backbone("resnet12", 3, widths=(4, 6, 8, 10), dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules())


def test_last_stage_prefix_of_backbone_and_of_a_wrapper() -> None:
    net = create_backbone("resnet12", 3, **TINY["resnet12"])
    assert last_stage_prefix(net) == "stages.3"
    wrapper = torch.nn.Sequential()
    wrapper.add_module("encoder", create_backbone("resnet25", 3, **TINY["resnet25"]))
    wrapper.add_module("head", torch.nn.Linear(8, 5))
    assert last_stage_prefix(wrapper) == "encoder.stages.2"


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet18'.*conv4, resnet12, resnet25"):
        create_backbone("resnet18", 3)


def test_unknown_option_lists_the_allowed_ones() -> None:
    with pytest.raises(
        ConfigError, match="'resnet12' has no option 'width'.*allowed: dropout, slope, widths"
    ):
        create_backbone("resnet12", 3, width=(1, 2, 3, 4))
    assert backbone_options("conv4") == ["hidden"]


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("resnet12", {"widths": (64, 160, 320)}, "widths"),
        ("resnet25", {"widths": (8, 0, 8)}, "widths"),
        ("conv4", {"hidden": -1}, "hidden"),
        ("resnet12", {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_option_values_are_config_errors(name: str, kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}': {key}"):
        create_backbone(name, 3, **kwargs)


def test_bad_in_channels_and_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        create_backbone("conv4", 0)
    net = create_backbone("conv4", 1, hidden=4)
    with pytest.raises(ValueError, match=r"expects images \[B, 1, H, W\]"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="at least 16 px"):
        net(torch.randn(2, 1, 8, 8))

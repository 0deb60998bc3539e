"""Backbones (feature extractors Θ) and scale-and-shift (SS) adaptation of MTL."""

from metatransfer.models.backbones import (
    BACKBONES,
    Backbone,
    Conv4,
    ResNet12,
    ResNet25,
    backbone_options,
    create_backbone,
    register_backbone,
)
from metatransfer.models.scale_shift import (
    SSConv2d,
    convert_to_ss,
    count_trainable,
    describe_trainable,
    fold_ss,
    last_stage_prefix,
    ss_parameters,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "Conv4",
    "ResNet12",
    "ResNet25",
    "SSConv2d",
    "backbone_options",
    "convert_to_ss",
    "count_trainable",
    "create_backbone",
    "describe_trainable",
    "fold_ss",
    "last_stage_prefix",
    "register_backbone",
    "ss_parameters",
]

"""The trained few-shot model of phase 2 and 3: a backbone (SS form) plus theta, the base learner's init.

`prepare_backbone` applies a method's adaptation (SS on every conv, SS on the last stage, or
parameter-level fine-tuning) to a pre-trained backbone; `inner_loop` builds the base learner's
`InnerLoop` from the config. Its files are written and read by `model_files`.
"""

from __future__ import annotations

import torch
from torch import nn

from metatransfer.config import SS_METHODS, MetaConfig
from metatransfer.models.base_learner import InnerLoop
from metatransfer.models.scale_shift import Layers, convert_to_ss, last_stage_prefix


class MetaLearner(nn.Module):
    """The adapted network: backbone (SS form for mtl/ss-last) plus theta, the classifier initialisation."""

    def __init__(self, backbone: nn.Module, way: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = int(backbone.out_dim)  # type: ignore[arg-type]
        # Zeros: the first inner step then moves each row towards its class's support mean.
        self.theta_weight = nn.Parameter(torch.zeros(way, dim))
        self.theta_bias = nn.Parameter(torch.zeros(way))

    def init_for(self, way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """theta for a `way`-class task; another way than trained uses the mean row for every class
        (labels are assigned at random in meta-training, so rows are exchangeable)."""
        if way == self.theta_weight.shape[0]:
            return self.theta_weight, self.theta_bias
        return (
            self.theta_weight.mean(0, keepdim=True).expand(way, -1),
            self.theta_bias.mean().expand(way),
        )

    @torch.no_grad()
    def frozen_init(self, way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`init_for(way)` as plain fp32 CPU tensors, for meta-test over cached features."""
        w, b = self.init_for(way)
        return w.detach().float().cpu(), b.detach().float().cpu()


def prepare_backbone(backbone: nn.Module, meta: MetaConfig) -> list[nn.Parameter]:
    """Apply the method's adaptation to a pre-trained backbone; returns the outer-loop parameters of it.

    mtl: SS on every conv; ss-last: SS on the last stage; ft-last: the last stage's own weights are
    meta-learned (parameter-level fine-tuning); ft-theta: backbone frozen, only theta is meta-learned.
    """
    train_bn = meta.bn in ("train", "batch")
    if meta.method in SS_METHODS:
        layers: Layers = "all" if meta.method == "mtl" else "last"
        convert_to_ss(
            backbone,
            layers=layers,
            granularity=meta.ss_granularity,
            train_bn=train_bn,
            batch_stats=meta.bn == "batch",
        )
    else:
        backbone.requires_grad_(False)
        if meta.method == "ft-last":
            backbone.get_submodule(last_stage_prefix(backbone)).requires_grad_(True)
    return [p for p in backbone.parameters() if p.requires_grad]


def inner_loop(meta: MetaConfig, test: bool = False) -> InnerLoop:
    return InnerLoop(
        steps=meta.inner_steps_test if test else meta.inner_steps,
        lr=meta.inner_lr,
        temperature=meta.temperature,
        normalize=meta.normalize_features,
        init=meta.classifier_init,
    )

"""What both paths of a benchmark start from: backbones, random image stores, runtimes and task tensors.

Both paths get the same backbone weights, the same episodes and the same uint8 images; only the code
that trains on them differs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from metatransfer.config import Config, MetaConfig, Precision
from metatransfer.data.augment import to_float
from metatransfer.data.preprocess import Preprocess
from metatransfer.data.sampler import Episode
from metatransfer.data.store import ImageStore
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, prepare_backbone
from metatransfer.models.scale_shift import convert_to_ss
from metatransfer.train.evaluate import episode_labels

WAY, SHOT, QUERY = 5, 1, 15
PRETRAIN_CLASSES = 64  # miniImageNet's train split
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PAPER_WIDTHS = [64, 160, 320, 640]  # ResNet-12 of the paper and of configs/mini-imagenet.yaml


@dataclass(frozen=True)
class Net:
    """A backbone at an input size: ``create_backbone(name, channels, **args)`` fed size x size images."""

    name: str
    size: int
    channels: int = 3
    args: Mapping[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        widths = self.args.get("widths")
        extra = f" {'-'.join(str(w) for w in widths)}" if isinstance(widths, Sequence) else ""
        return f"{self.name}{extra} {self.size}px"

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)  # both paths start from the same weights
        return create_backbone(self.name, self.channels, **self.args)

    def preprocess(self) -> Preprocess:
        return Preprocess(self.size, self.channels, MEAN[: self.channels], STD[: self.channels])


@dataclass(frozen=True)
class Target:
    """Where a benchmark runs: ``device`` ("cpu", "cuda") and, on the CPU, torch's thread count."""

    device: str = "cpu"
    threads: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def threads_or_default(self) -> int:
        return self.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1)

    def runtime(
        self,
        meta: MetaConfig | None = None,
        *,
        compile: bool = False,
        precision: Precision = "auto",
        channels_last: bool = True,
    ) -> tuple[Config, Runtime]:
        """The project's config and runtime here (precision "auto": bf16 where the device has it)."""
        cfg = Config(
            device=self.device,
            precision=precision,
            channels_last=channels_last,
            threads=self.threads_or_default() if self.device == "cpu" else 0,
            compile=compile,
            meta=meta or MetaConfig(),
        )
        return cfg, resolve_runtime(cfg)


def random_store(
    classes: int, per_class: int, size: int, channels: int, split: str, seed: int = 0
) -> ImageStore:
    """A class-major ImageStore of random uint8 images [classes * per_class, size, size, channels]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(classes * per_class, size, size, channels), dtype=np.uint8)
    offsets = np.arange(classes + 1, dtype=np.int64) * per_class
    return ImageStore.from_offsets(images, offsets, [f"class{c:03d}" for c in range(classes)], split)


Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def episode_tensors(
    store: ImageStore, episode: Episode, pre: Preprocess, device: torch.device, shot: int = SHOT
) -> Task:
    """The reference's input for one episode: fp32 (xs, ys, xq, yq) on ``device``, as its data loader
    would hand it over (prepared outside the timed loop)."""

    def images(rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(store.images[rows]))
        return to_float(x, pre.mean, pre.std).to(device)

    ys, yq = episode_labels(WAY, shot, 1, device)[0], episode_labels(WAY, QUERY, 1, device)[0]
    return images(episode.support), ys, images(episode.query), yq


def meta_config(meta_batch: int, inner_steps: int, shot: int = SHOT) -> MetaConfig:
    return MetaConfig(
        way=WAY,
        shot=shot,
        query=QUERY,
        meta_batch=meta_batch,
        inner_steps=inner_steps,
        inner_steps_test=inner_steps,
    )


def reference_learner(
    backbone: nn.Module, learner: MetaLearner, meta: MetaConfig, device: torch.device
) -> tuple[nn.Module, list[torch.Tensor], torch.optim.Optimizer]:
    """The original's model from the pre-trained ``backbone`` (not yet in SS form): an fp32, contiguous
    copy with the original's SS convolutions and theta = [W, b] (the learner's values), with the
    original's Adam over the SS parameters and theta.

    The original (``Conv2dMtl``) scales kernel-wise and multiplies the scale into the weight,
    ``conv(x, W * s)``, so its backward runs the weight-gradient convolution; ``granularity="kernel"``
    is exactly that form. The project scales filter-wise (the paper's choice) and applies the scale to
    the conv output, which skips that convolution.
    """
    encoder = copy.deepcopy(backbone).float().to(memory_format=torch.contiguous_format).eval()
    convert_to_ss(encoder, layers="all", granularity="kernel", train_bn=meta.bn == "train")
    encoder.to(device)
    theta: list[torch.Tensor] = [
        nn.Parameter(learner.theta_weight.detach().clone().to(device)),
        nn.Parameter(learner.theta_bias.detach().clone().to(device)),
    ]
    ss = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": ss, "lr": meta.lr_ss}, {"params": theta, "lr": meta.lr_theta}])
    return encoder, theta, opt


def project_learner(net: Net, meta: MetaConfig, runtime: Runtime) -> MetaLearner:
    """The project's MetaLearner of ``net``'s seeded weights: SS backbone, on the runtime."""
    backbone = net.build()
    prepare_backbone(backbone, meta)
    learner = MetaLearner(backbone, WAY)
    runtime.model(learner)
    return learner


def meta_models(
    net: Net, meta: MetaConfig, runtime: Runtime
) -> tuple[MetaLearner, nn.Module, list[torch.Tensor], torch.optim.Optimizer]:
    """The project's MetaLearner and the reference's model of the same weights (on the runtime's device)."""
    learner = project_learner(net, meta, runtime)
    encoder, theta, opt = reference_learner(net.build(), learner, meta, runtime.device)
    return learner, encoder, theta, opt

"""The base learner theta: a linear classifier adapted on each task's support set (the inner loop).

All functions are batched over tasks: T tasks with n support examples of dimension d are one
[T, n, d] tensor, and theta is ([T, way, d], [T, way]). The cross-entropy gradient of a linear
classifier has the closed form  dL/dW = s * (P - Y)^T X / n,  dL/db = sum_i (P - Y)_i / n, so the
inner loop needs no autograd graph: at meta-test thousands of episodes adapt in one batched loop,
and in first-order meta-training the steps carry no graph (with the zero start, neither does the
support branch). Written with ordinary tensor ops, the same loop is also differentiable, which gives
the exact (second-order) mode.

With `init="proto"` the loop starts from the nearest-class-mean classifier of the support set
(Proto-MAML, Triantafillou et al. 2020) plus the meta-learned theta: at step 0 it *is* nearest class
mean, so the inner loop can only refine it (with steps=0 it stays exactly NCM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class InnerLoop:
    """How the base learner adapts: `steps` gradient steps of size `lr` on the support loss."""

    steps: int
    lr: float
    temperature: float = 10.0  # logit scale s; with normalised features logits are s * cosine-like scores
    normalize: bool = True  # L2-normalise features first, so one lr suits every backbone
    weight_decay: float = 0.0  # L2 penalty on the weight (logistic-regression baseline)
    init: str = "zero"  # "zero": start from theta alone; "proto": theta + the support's prototype classifier

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.temperature <= 0 or self.init not in ("zero", "proto"):
            raise ValueError(
                f"InnerLoop needs steps >= 0, lr > 0, temperature > 0, init 'zero' or 'proto'; got {self}"
            )


def prepare(features: torch.Tensor, loop: InnerLoop) -> torch.Tensor:
    """[..., d] features -> [..., d] float32 features as the classifier sees them (normalised if asked)."""
    features = features.float()
    return F.normalize(features, dim=-1) if loop.normalize else features


def logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, loop: InnerLoop) -> torch.Tensor:
    """x [T, n, d] prepared features, weight [T, way, d], bias [T, way] -> logits [T, n, way]."""
    return loop.temperature * torch.bmm(x, weight.transpose(1, 2)) + bias.unsqueeze(1)


def prototype_classifier(
    x: torch.Tensor, y: torch.Tensor, way: int, loop: InnerLoop
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest-class-mean classifier of a support set as linear weights ([T, way, d], [T, way]).

    x: [T, n, d] prepared support features, y: [T, n]. With normalised features W is each class's
    normalised mean and b = 0, so `logits` = temperature * cosine to the prototype: the ranking of the
    `ncm` baseline. On raw features it is Proto-MAML's squared-Euclidean form, W = 2p / temperature and
    b = -|p|^2, so `logits` = -|x - p|^2 + |x|^2. Differentiable in x.
    """
    onehot = F.one_hot(y, way).to(x.dtype)  # [T, n, way]
    protos = torch.bmm(onehot.transpose(1, 2), x) / onehot.sum(1).clamp_min(1).unsqueeze(-1)  # [T, way, d]
    if loop.normalize:
        return F.normalize(protos, dim=-1), protos.new_zeros(protos.shape[:2])
    return 2 * protos / loop.temperature, -(protos**2).sum(-1)


def start(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, loop: InnerLoop
) -> tuple[torch.Tensor, torch.Tensor]:
    """theta at step 0: `weight` [T, way, d], `bias` [T, way] (the meta-learned init), plus the support
    set's prototype classifier when `loop.init == "proto"`."""
    if loop.init == "zero":
        return weight, bias
    w, b = prototype_classifier(x, y, weight.shape[1], loop)
    return weight + w, bias + b


def adapt(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, loop: InnerLoop
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the inner loop on the support set.

    x: [T, n, d] prepared support features; y: [T, n] int64 labels in 0..way-1;
    weight: [T, way, d] and bias: [T, way], the meta-learned theta (broadcast it with `expand`); the
    loop starts from `start(...)`. Returns theta' after `loop.steps` steps of plain gradient descent on
    the mean cross-entropy (plus `weight_decay / 2 * |W|^2`). Differentiable in x, weight and bias when
    they require grad.
    """
    return _descend(x, y, *start(x, y, weight, bias, loop), loop)


def _descend(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, loop: InnerLoop
) -> tuple[torch.Tensor, torch.Tensor]:
    """`loop.steps` gradient steps from (weight, bias) itself, in the closed form of the module docstring."""
    way = weight.shape[1]
    onehot = F.one_hot(y, way).to(x.dtype)  # [T, n, way]
    scale = loop.temperature / y.shape[1]
    for _ in range(loop.steps):
        residual = torch.softmax(logits(x, weight, bias, loop), dim=-1) - onehot  # [T, n, way]
        grad_w = scale * torch.bmm(residual.transpose(1, 2), x)
        if loop.weight_decay:
            grad_w = grad_w + loop.weight_decay * weight
        weight = weight - loop.lr * grad_w
        bias = bias - loop.lr * residual.sum(dim=1) / y.shape[1]
    return weight, bias


def adapt_first_order(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, loop: InnerLoop
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order inner loop (the original MTL code's): theta' = start + delta, delta computed without a graph.

    The start (`start(...)`) keeps its graph, so the query loss reaches theta's initialisation through
    the identity path and, with the prototype start, the support features through the prototypes
    (first-order Proto-MAML); only the steps' own derivatives are dropped, exactly as `autograd.grad`
    without `create_graph` does. With the zero start the backbone learns from the query features only.
    """
    w0, b0 = start(x, y, weight, bias, loop)
    with torch.no_grad():
        w_new, b_new = _descend(x.detach(), y, w0.detach(), b0.detach(), loop)
        dw, db = w_new - w0.detach(), b_new - b0.detach()
    return w0 + dw, b0 + db


def per_class_accuracy(scores: torch.Tensor, y: torch.Tensor, way: int) -> torch.Tensor:
    """scores [T, n, way], y [T, n] -> [T, way] fraction of each class's queries classified correctly."""
    correct = (scores.argmax(-1) == y).float()  # [T, n]
    onehot = F.one_hot(y, way).float()  # [T, n, way]
    return torch.einsum("tn,tnw->tw", correct, onehot) / onehot.sum(1).clamp_min(1)


def per_class_loss(scores: torch.Tensor, y: torch.Tensor, way: int) -> torch.Tensor:
    """scores [T, n, way], y [T, n] -> [T, way] mean cross-entropy of each class's queries."""
    ce = F.cross_entropy(scores.transpose(1, 2), y, reduction="none")  # [T, n]
    onehot = F.one_hot(y, way).float()
    return torch.einsum("tn,tnw->tw", ce.detach().float(), onehot) / onehot.sum(1).clamp_min(1)

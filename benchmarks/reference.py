"""The reference loops: what the original MTL PyTorch code does, written against this project's modules.

The original (yaoyao-liu/meta-transfer-learning, ``pytorch/models/mtl.py`` ``MtlLearner.meta_forward``)
runs, per task and in fp32: the encoder over the query images, the encoder over the support images
(both recording an autograd graph), then ``update_step`` steps of ``torch.autograd.grad`` over a
Python list ``[W, b]`` of the linear base learner without ``create_graph``, computing the query
logits after every step. Meta-training then backpropagates the query loss and takes an Adam step;
meta-test calls the very same function once per episode (in eval mode, graph still recorded).
Pre-training is a plain fp32 step over already-normalised tensors.

The reference gets its images as ready float tensors (the original's DataLoader workers prepare them
outside the timed loop), so its figures leave out every data cost the project's figures include.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reference_forward(
    encoder: nn.Module,
    theta: list[torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """The original ``meta_forward``: query logits [nq, way] after ``steps`` autograd inner steps.

    encoder: [B, C, H, W] -> [B, d]; theta: [W [way, d], b [way]]; xs [ns, C, H, W] with labels ys [ns];
    xq [nq, C, H, W]. Needs grad mode on (the inner loop calls ``torch.autograd.grad``).
    """
    if steps < 1:
        raise ValueError(f"the original inner loop takes at least one step, got steps={steps}")
    embedding_query = encoder(xq)
    embedding_shot = encoder(xs)
    fast = list(theta)
    logits_q = embedding_query.new_empty(0)
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(embedding_shot, fast[0], fast[1]), ys)
        grads = torch.autograd.grad(loss, fast)
        fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        logits_q = F.linear(embedding_query, fast[0], fast[1])
    return logits_q


def reference_meta_task(
    encoder: nn.Module,
    theta: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    task: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
) -> float:
    """One meta-training task of the original loop (one task per outer update); returns the query loss.

    task: (xs [ns, C, H, W], ys [ns], xq [nq, C, H, W], yq [nq]) fp32 tensors.
    """
    xs, ys, xq, yq = task
    loss = F.cross_entropy(reference_forward(encoder, theta, xs, ys, xq, steps, lr), yq)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def reference_test_episode(
    encoder: nn.Module,
    theta: list[torch.Tensor],
    task: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
) -> float:
    """One meta-test episode of the original loop (encoder run on the episode's images); query accuracy."""
    xs, ys, xq, yq = task
    logits = reference_forward(encoder, theta, xs, ys, xq, steps, lr)
    return float((logits.argmax(-1) == yq).float().mean())


def reference_pretrain_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    """A plain fp32 supervised step on a normalised batch x [B, C, H, W] with labels y [B]; the loss."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())

"""Base learner: the closed-form inner loop against hand numbers, autograd, finite differences and the
original MTL code's first-order loop; per-class accuracy and loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metatransfer.models.base_learner import (
    InnerLoop,
    adapt,
    adapt_first_order,
    logits,
    per_class_accuracy,
    per_class_loss,
    prepare,
    prototype_classifier,
)

WAY_SHOT = [(2, 1), (3, 2), (5, 1), (5, 5)]


def labels(tasks: int, way: int, per_class: int) -> torch.Tensor:
    """Class-major labels [tasks, way*per_class], the order the episode sampler uses."""
    return torch.arange(way).repeat_interleave(per_class).expand(tasks, -1).contiguous()


# --- (a) a tiny linear problem worked out by hand ---------------------------------------------------------
# T=1, d=2, way=2, n=2, temperature 1, no normalisation, lr 0.5. Support x0=(1, 2) of class 0 and
# x1=(3, -1) of class 1. Loss = mean cross-entropy; dL/dW = (P - Y)^T X / n, dL/db = sum_i (P - Y)_i / n.
X = np.array([[1.0, 2.0], [3.0, -1.0]])
Y = np.array([[1.0, 0.0], [0.0, 1.0]])
LR = 0.5


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _hand_step(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _softmax_rows(X @ w.T + b)  # [n, way]
    r = p - Y
    return w - LR * r.T @ X / 2, b - LR * r.sum(axis=0) / 2


def _run_adapt(w0: np.ndarray, b0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    loop = InnerLoop(steps=steps, lr=LR, temperature=1.0, normalize=False)
    x = torch.tensor(X, dtype=torch.float64).unsqueeze(0)
    y = torch.tensor([[0, 1]])
    w, b = adapt(
        x, y, torch.tensor(w0, dtype=torch.float64)[None], torch.tensor(b0, dtype=torch.float64)[None], loop
    )
    return w[0].numpy(), b[0].numpy()


def test_adapt_one_step_from_zero_matches_hand_numbers() -> None:
    # theta = 0: every logit is 0, P = 1/2 everywhere, P - Y = [[-1/2, 1/2], [1/2, -1/2]].
    # (P - Y)^T X = [[-1/2*1 + 1/2*3, -1/2*2 + 1/2*(-1)], [+1, +1.5]] = [[1, -1.5], [-1, 1.5]]; / n = 2
    # gives dW = [[0.5, -0.75], [-0.5, 0.75]]; db = column sums / 2 = [0, 0].
    w1, b1 = _run_adapt(np.zeros((2, 2)), np.zeros(2), steps=1)
    np.testing.assert_allclose(w1, [[-0.25, 0.375], [0.25, -0.375]], atol=1e-12)
    np.testing.assert_allclose(b1, [0.0, 0.0], atol=1e-12)


def test_adapt_two_steps_from_zero_matches_hand_numbers() -> None:
    # After step 1 (above) the logits are x0: (0.5, -0.5) and x1: (-1.125, 1.125), so with
    # sigma(z) = 1 / (1 + e^-z): P = [[s(1), 1 - s(1)], [s(-2.25), 1 - s(-2.25)]].
    s1, s2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.25))
    r = np.array([[s1 - 1, 1 - s1], [s2, -s2]])  # P - Y
    w2 = np.array([[-0.25, 0.375], [0.25, -0.375]]) - LR * r.T @ X / 2
    b2 = -LR * r.sum(axis=0) / 2
    assert abs(b2[0]) > 0.01  # the second step does move the bias, so the check covers it
    w, b = _run_adapt(np.zeros((2, 2)), np.zeros(2), steps=2)
    np.testing.assert_allclose(w, w2, atol=1e-6)
    np.testing.assert_allclose(b, b2, atol=1e-6)


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_adapt_from_nonzero_init_matches_numpy_steps(steps: int) -> None:
    w0, b0 = np.array([[0.3, -0.2], [-0.1, 0.4]]), np.array([0.25, -0.5])
    w_ref, b_ref = w0, b0
    for _ in range(steps):
        w_ref, b_ref = _hand_step(w_ref, b_ref)
    w, b = _run_adapt(w0, b0, steps)
    np.testing.assert_allclose(w, w_ref, atol=1e-6)
    np.testing.assert_allclose(b, b_ref, atol=1e-6)


# --- (b) the closed form equals autograd gradient descent on F.cross_entropy --------------------------


def _autograd_descent(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, loop: InnerLoop
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per task, plain gradient descent with torch.autograd on the mean cross-entropy
    plus weight_decay / 2 * |W|^2."""
    outs_w, outs_b = [], []
    for t in range(x.shape[0]):
        wt, bt = w[t].clone(), b[t].clone()
        for _ in range(loop.steps):
            wt.requires_grad_(True)
            bt.requires_grad_(True)
            loss = F.cross_entropy(loop.temperature * x[t] @ wt.T + bt, y[t])
            loss = loss + loop.weight_decay / 2 * (wt**2).sum()
            gw, gb = torch.autograd.grad(loss, (wt, bt))
            wt, bt = (wt - loop.lr * gw).detach(), (bt - loop.lr * gb).detach()
        outs_w.append(wt)
        outs_b.append(bt)
    return torch.stack(outs_w), torch.stack(outs_b)


@pytest.mark.parametrize("way,shot", WAY_SHOT)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_adapt_equals_autograd_descent(way: int, shot: int, normalize: bool, weight_decay: float) -> None:
    torch.manual_seed(way * 10 + shot)
    tasks, d = 3, 7
    loop = InnerLoop(steps=4, lr=0.3, temperature=4.0, normalize=normalize, weight_decay=weight_decay)
    x = prepare(torch.randn(tasks, way * shot, d), loop).double()
    y = labels(tasks, way, shot)
    w0, b0 = (
        0.3 * torch.randn(tasks, way, d, dtype=torch.float64),
        0.3 * torch.randn(tasks, way, dtype=torch.float64),
    )
    w, b = adapt(x, y, w0, b0, loop)
    w_ref, b_ref = _autograd_descent(x, y, w0, b0, loop)
    assert not torch.allclose(w, w0)  # the loop did move theta
    torch.testing.assert_close(w, w_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(b, b_ref, atol=1e-10, rtol=1e-10)


def test_prepare_normalizes_only_when_asked() -> None:
    x = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    on = prepare(x, InnerLoop(steps=1, lr=0.1, normalize=True))
    off = prepare(x, InnerLoop(steps=1, lr=0.1, normalize=False))
    assert on.dtype == off.dtype == torch.float32
    torch.testing.assert_close(on, torch.tensor([[[0.6, 0.8]]]))
    torch.testing.assert_close(off, torch.tensor([[[3.0, 4.0]]]))


def test_logits_shape_and_values() -> None:
    loop = InnerLoop(steps=1, lr=0.1, temperature=2.0)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [1, 3, 2]
    w = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [1, 2, 2]
    b = torch.tensor([[0.5, -0.5]])
    expected = torch.tensor([[[2.5, 5.5], [4.5, 7.5], [6.5, 13.5]]])
    torch.testing.assert_close(logits(x, w, b, loop), expected)


@pytest.mark.parametrize(
    "kwargs", [{"steps": -1, "lr": 0.1}, {"steps": 1, "lr": 0.0}, {"steps": 1, "lr": 0.1, "temperature": 0.0}]
)
def test_inner_loop_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="InnerLoop needs"):
        InnerLoop(**kwargs)  # type: ignore[arg-type]


# --- (c) exact mode: gradients through the inner loop match central finite differences -----------------


def _query_loss(
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    loop: InnerLoop,
) -> torch.Tensor:
    xs_n = F.normalize(xs, dim=-1) if loop.normalize else xs  # prepare() casts to float32; keep float64 here
    xq_n = F.normalize(xq, dim=-1) if loop.normalize else xq
    w, b = adapt(xs_n, ys, w0.expand(xs.shape[0], -1, -1), b0.expand(xs.shape[0], -1), loop)
    scores = logits(xq_n, w, b, loop)
    return F.cross_entropy(scores.flatten(0, 1), yq.flatten())


def _central_differences(
    fn: Callable[[], torch.Tensor], tensor: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """d fn() / d tensor by (fn(t + eps) - fn(t - eps)) / 2 eps, one element at a time (tensor is edited in place)."""
    grad = torch.zeros_like(tensor)
    flat, gflat = tensor.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        keep = flat[i].item()
        flat[i] = keep + eps
        plus = fn().item()
        flat[i] = keep - eps
        minus = fn().item()
        flat[i] = keep
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("way,shot,query", [(2, 1, 2), (3, 2, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_exact_gradients_match_finite_differences(way: int, shot: int, query: int, normalize: bool) -> None:
    torch.manual_seed(way + shot + query)
    tasks, d = 2, 3
    loop = InnerLoop(steps=3, lr=0.5, temperature=2.0, normalize=normalize)
    xs = torch.randn(tasks, way * shot, d, dtype=torch.float64)
    xq = torch.randn(tasks, way * query, d, dtype=torch.float64)
    ys, yq = labels(tasks, way, shot), labels(tasks, way, query)
    w0 = 0.5 * torch.randn(way, d, dtype=torch.float64)
    b0 = 0.5 * torch.randn(way, dtype=torch.float64)

    leaves = [t.clone().requires_grad_(True) for t in (w0, b0, xs)]
    loss = _query_loss(leaves[2], ys, xq, yq, leaves[0], leaves[1], loop)
    grads = torch.autograd.grad(loss, leaves)

    for g, tensor in zip(grads, (w0, b0, xs), strict=True):
        with torch.no_grad():
            fd = _central_differences(lambda: _query_loss(xs, ys, xq, yq, w0, b0, loop), tensor)
        assert fd.abs().max() > 1e-4  # a real signal, not two zeros agreeing
        torch.testing.assert_close(g, fd, atol=1e-7, rtol=1e-5)


# --- (d) first-order mode against the original MTL code's loop -----------------------------------------


def _original_first_order(
    xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, loop: InnerLoop
) -> list[torch.Tensor]:
    """Query scores per task, written as the original PyTorch MTL code adapts its base learner:
    autograd.grad without create_graph over a Python list of weights, fast = w - lr * grad."""
    out = []
    for t in range(xs.shape[0]):
        fast = [w0, b0]
        for _ in range(loop.steps):
            loss = F.cross_entropy(loop.temperature * xs[t] @ fast[0].T + fast[1], ys[t])
            grad = torch.autograd.grad(loss, fast)
            fast = [p - loop.lr * g for p, g in zip(fast, grad, strict=True)]
        out.append(loop.temperature * xq[t] @ fast[0].T + fast[1])
    return out


def _random_problem(
    tasks: int, way: int, shot: int, query: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Support and query labels, and float64 features xs, xq with an init w0, b0 drawn from torch's generator."""
    base = {
        "xs": torch.randn(tasks, way * shot, d, dtype=torch.float64),
        "xq": torch.randn(tasks, way * query, d, dtype=torch.float64),
        "w0": 0.3 * torch.randn(way, d, dtype=torch.float64),
        "b0": 0.3 * torch.randn(way, dtype=torch.float64),
    }
    return labels(tasks, way, shot), labels(tasks, way, query), base


@pytest.mark.parametrize("way,shot,query", [(2, 1, 3), (3, 2, 2), (5, 5, 1)])
def test_first_order_matches_original_code(way: int, shot: int, query: int) -> None:
    torch.manual_seed(100 + way * shot)
    tasks = 3
    loop = InnerLoop(steps=5, lr=0.4, temperature=3.0, normalize=False)
    ys, yq, base = _random_problem(tasks, way, shot, query, d=6)

    mine = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    w, b = adapt_first_order(
        mine["xs"], ys, mine["w0"].expand(tasks, -1, -1), mine["b0"].expand(tasks, -1), loop
    )
    scores = logits(mine["xq"], w, b, loop)
    sum(F.cross_entropy(scores[t], yq[t]) for t in range(tasks)).backward()  # type: ignore[union-attr]

    ref = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    ref_scores = _original_first_order(ref["xs"], ys, ref["xq"], ref["w0"], ref["b0"], loop)
    sum(F.cross_entropy(s, yq[t]) for t, s in enumerate(ref_scores)).backward()  # type: ignore[union-attr]

    torch.testing.assert_close(scores, torch.stack(ref_scores), atol=1e-10, rtol=1e-10)
    for k in ("w0", "b0", "xq"):
        assert mine[k].grad is not None and ref[k].grad is not None, k
        torch.testing.assert_close(mine[k].grad, ref[k].grad, atol=1e-10, rtol=1e-10)
    assert mine["xs"].grad is None  # first order: the support branch carries no graph
    assert ref["xs"].grad is None


def test_first_order_differs_from_exact_on_the_init_gradient() -> None:
    # Guards against "first order" silently being exact (or exact silently being first order).
    torch.manual_seed(3)
    way, shot, tasks, d = 3, 2, 2, 4
    loop = InnerLoop(steps=3, lr=0.5, temperature=2.0, normalize=False)
    xs, xq = torch.randn(tasks, way * shot, d), torch.randn(tasks, way * 2, d)
    ys, yq = labels(tasks, way, shot), labels(tasks, way, 2)
    grads = []
    for fn in (adapt, adapt_first_order):
        w0 = torch.zeros(way, d, requires_grad=True)
        w, b = fn(xs, ys, w0.expand(tasks, -1, -1), torch.zeros(tasks, way), loop)
        F.cross_entropy(logits(xq, w, b, loop).flatten(0, 1), yq.flatten()).backward()
        grads.append(w0.grad)
    assert grads[0] is not None and grads[1] is not None
    assert not torch.allclose(grads[0], grads[1], atol=1e-4)


def test_first_order_forward_equals_exact_forward() -> None:
    torch.manual_seed(4)
    loop = InnerLoop(steps=4, lr=0.2, temperature=5.0)
    x, y = prepare(torch.randn(2, 6, 5), loop), labels(2, 3, 2)
    w0, b0 = torch.randn(2, 3, 5), torch.randn(2, 3)
    for got, want in zip(adapt_first_order(x, y, w0, b0, loop), adapt(x, y, w0, b0, loop), strict=True):
        torch.testing.assert_close(got, want)


# --- (e) per-class accuracy and loss ------------------------------------------------------------------


def test_per_class_accuracy_and_loss_on_fabricated_scores() -> None:
    # T=2 tasks, way=3, two queries per class (class-major labels 0,0,1,1,2,2).
    scores = torch.tensor(
        [
            [
                [2, 0, 0],
                [0, 3, 0],
                [0, 1, 0],
                [0, 2, 0],
                [0, 0, 1],
                [1, 0, 4],
            ],  # class 0: 1/2, 1: 2/2, 2: 2/2
            [
                [0, 1, 0],
                [0, 0, 2],
                [5, 0, 0],
                [0, 0, 1],
                [0, 0, 3],
                [3, 0, 0],
            ],  # class 0: 0/2, 1: 0/2, 2: 1/2
        ],
        dtype=torch.float32,
    )
    y = labels(2, 3, 2)
    acc = per_class_accuracy(scores, y, 3)
    torch.testing.assert_close(acc, torch.tensor([[0.5, 1.0, 1.0], [0.0, 0.0, 0.5]]))

    s = scores.numpy().astype(np.float64)
    nll = np.log(np.exp(s).sum(-1)) - np.take_along_axis(s, y.numpy()[..., None], -1)[..., 0]  # [T, n]
    expected = nll.reshape(2, 3, 2).mean(-1)  # class-major: the two queries of class c are 2c, 2c+1
    loss = per_class_loss(scores, y, 3)
    assert loss.shape == (2, 3)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)


def test_per_class_loss_carries_no_graph_and_absent_class_scores_zero() -> None:
    scores = torch.randn(1, 4, 3, requires_grad=True)
    y = torch.tensor([[0, 0, 1, 1]])  # class 2 has no queries
    assert not per_class_loss(scores, y, 3).requires_grad
    assert per_class_loss(scores, y, 3)[0, 2].item() == 0.0
    assert per_class_accuracy(scores, y, 3)[0, 2].item() == 0.0


# --- prototype start (Proto-MAML): step 0 is nearest class mean ----------------------------------------------


def _ncm_scores(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, way: int) -> torch.Tensor:
    """Cosine to the mean of the normalised support features of each class, written out plainly."""
    xs, xq = F.normalize(xs, dim=-1), F.normalize(xq, dim=-1)
    protos = torch.stack(
        [torch.stack([xs[t][ys[t] == c].mean(0) for c in range(way)]) for t in range(len(xs))]
    )
    return torch.einsum("tqd,twd->tqw", xq, F.normalize(protos, dim=-1))


@pytest.mark.parametrize(("way", "shot"), WAY_SHOT)
def test_proto_start_with_no_steps_is_nearest_class_mean(way: int, shot: int) -> None:
    torch.manual_seed(way * 10 + shot)
    loop = InnerLoop(steps=0, lr=0.5, temperature=10.0, normalize=True, init="proto")
    xs, xq = torch.randn(3, way * shot, 16), torch.randn(3, 20, 16)
    ys = labels(3, way, shot)
    zero = torch.zeros(3, way, 16), torch.zeros(3, way)
    w, b = adapt(prepare(xs, loop), ys, *zero, loop)
    scores = logits(prepare(xq, loop), w, b, loop)
    torch.testing.assert_close(scores, 10.0 * _ncm_scores(xs, ys, xq, way), atol=1e-5, rtol=1e-5)
    # The zero start, by contrast, scores every class alike.
    plain = InnerLoop(steps=0, lr=0.5, temperature=10.0, normalize=True)
    assert torch.all(logits(prepare(xq, plain), *adapt(prepare(xs, plain), ys, *zero, plain), plain) == 0)


def test_proto_start_on_raw_features_is_squared_euclidean() -> None:
    torch.manual_seed(1)
    loop = InnerLoop(steps=0, lr=0.1, temperature=4.0, normalize=False, init="proto")
    xs, xq, ys = torch.randn(2, 6, 5), torch.randn(2, 7, 5), labels(2, 3, 2)
    w, b = prototype_classifier(xs, ys, 3, loop)
    protos = xs.reshape(2, 3, 2, 5).mean(2)  # class-major support: [T, way, d]
    expected = -torch.cdist(xq, protos).square() + xq.square().sum(-1, keepdim=True)
    torch.testing.assert_close(logits(xq, w, b, loop), expected, atol=1e-4, rtol=1e-4)


def test_proto_start_adds_the_meta_learned_init_and_is_differentiable_in_the_features() -> None:
    torch.manual_seed(2)
    loop = InnerLoop(steps=3, lr=0.3, temperature=5.0, normalize=True, init="proto")
    xs = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    ys = labels(1, 2, 2)
    w0 = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    start_w, start_b = adapt(F.normalize(xs, dim=-1), ys, w0, b0, InnerLoop(0, 0.3, 5.0, True, init="proto"))
    pw, pb = prototype_classifier(F.normalize(xs, dim=-1), ys, 2, loop)
    torch.testing.assert_close(start_w, w0 + pw)
    torch.testing.assert_close(start_b, b0 + pb)
    xq = torch.randn(1, 5, 6, dtype=torch.float64)

    def query_loss(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        wa, ba = adapt(F.normalize(x, dim=-1), ys, w, b, loop)
        return logits(F.normalize(xq, dim=-1), wa, ba, loop).logsumexp(-1).sum()

    assert torch.autograd.gradcheck(query_loss, (xs, w0, b0))


def test_inner_loop_refuses_an_unknown_init() -> None:
    with pytest.raises(ValueError, match="init"):
        InnerLoop(steps=1, lr=0.1, init="random")


def _proto_maml_reference(
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    loop: InnerLoop,
    first_order: bool,
) -> torch.Tensor:
    """Proto-MAML's query loss written with autograd, task by task: start at theta plus the support's
    prototype classifier, then steps of autograd.grad on F.cross_entropy. First order drops only the
    steps' second-order terms (no create_graph, as the original code); the start keeps its graph."""
    losses = []
    for t in range(xs.shape[0]):
        s = F.normalize(xs[t], dim=-1) if loop.normalize else xs[t]
        q = F.normalize(xq[t], dim=-1) if loop.normalize else xq[t]
        protos = torch.stack([s[ys[t] == c].mean(0) for c in range(w0.shape[0])])
        if loop.normalize:
            w, b = w0 + F.normalize(protos, dim=-1), b0
        else:
            w, b = w0 + 2 * protos / loop.temperature, b0 - protos.square().sum(-1)
        for _ in range(loop.steps):
            inner = F.cross_entropy(loop.temperature * s @ w.T + b, ys[t])
            gw, gb = torch.autograd.grad(inner, (w, b), create_graph=not first_order)
            w, b = w - loop.lr * gw, b - loop.lr * gb
        losses.append(F.cross_entropy(loop.temperature * q @ w.T + b, yq[t], reduction="sum"))
    return torch.stack(losses).sum() / yq.numel()


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_proto_maml_gradient_matches_autograd(first_order: bool, normalize: bool) -> None:
    # First-order Proto-MAML: the gradient reaches the support features through the prototype start,
    # and theta through the identity path; only the inner steps' own derivatives are dropped.
    torch.manual_seed(5)
    tasks = 2
    loop = InnerLoop(steps=3, lr=0.4, temperature=3.0, normalize=normalize, init="proto")
    ys, yq, base = _random_problem(tasks, way=3, shot=2, query=2, d=5)
    mine = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    xs_n, xq_n = (F.normalize(mine[k], dim=-1) if normalize else mine[k] for k in ("xs", "xq"))
    fit = adapt_first_order if first_order else adapt
    w, b = fit(xs_n, ys, mine["w0"].expand(tasks, -1, -1), mine["b0"].expand(tasks, -1), loop)
    loss = F.cross_entropy(logits(xq_n, w, b, loop).flatten(0, 1), yq.flatten())
    grads = torch.autograd.grad(loss, list(mine.values()))

    ref = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    ref_loss = _proto_maml_reference(ref["xs"], ys, ref["xq"], yq, ref["w0"], ref["b0"], loop, first_order)
    ref_grads = torch.autograd.grad(ref_loss, list(ref.values()))
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for k, g, r in zip(mine, grads, ref_grads, strict=True):
        assert r.abs().max() > 1e-4, k  # a real signal, not two zeros agreeing
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=k)

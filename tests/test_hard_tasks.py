"""Hard tasks: failure classes and hard-task classes chosen from fabricated per-class accuracy tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metatransfer.train.hard_tasks import failure_classes, hard_task_classes, pooled_task_classes


def table(*rows: list[float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


# Three tasks of a 3-way meta-batch; classes 1 and 2 each appear in two tasks.
#   task 0: classes 1, 2, 3   acc 1.0, 0.2, 0.6   -> failure 2
#   task 1: classes 2, 4, 5   acc 0.0, 0.8, 0.6   -> failure 2 again
#   task 2: classes 6, 7, 1   acc 0.8, 0.4, 0.4   -> tie between 7 and 1, broken by loss (1.1 > 0.9): 1
# Batch ranking (acc up, loss down): 2 (0.0), 2 (0.2), 1 (0.4, 1.1), 7 (0.4, 0.9), 5 (0.6, 0.6),
# 3 (0.6, 0.5), 4 (0.8, 0.3), 6 (0.8, 0.2), 1 (1.0).
CLASSES = np.array([[1, 2, 3], [2, 4, 5], [6, 7, 1]])
ACC = table([1.0, 0.2, 0.6], [0.0, 0.8, 0.6], [0.8, 0.4, 0.4])
LOSS = table([0.1, 1.0, 0.5], [2.0, 0.3, 0.6], [0.2, 0.9, 1.1])


def test_failure_classes_lowest_accuracy_ties_to_higher_loss() -> None:
    out = failure_classes(ACC, LOSS, CLASSES)
    assert out.dtype == np.int64
    assert out.tolist() == [2, 2, 1]


def test_failure_class_full_tie_goes_to_the_earlier_position() -> None:
    assert failure_classes(
        table([0.5, 0.5, 0.9]), table([1.0, 1.0, 0.0]), np.array([[8, 9, 7]])
    ).tolist() == [8]


def test_failure_class_ignores_loss_when_accuracy_differs() -> None:
    # Class 5 has the larger loss but the higher accuracy: accuracy decides first.
    assert failure_classes(table([0.3, 0.4]), table([0.1, 9.0]), np.array([[4, 5]])).tolist() == [4]


@pytest.mark.parametrize(
    "way,expected",
    [
        (2, [2, 1]),  # the two distinct failure classes, hardest first
        (3, [2, 1, 7]),  # one fewer failure class than way: fill with the next-hardest (7)
        (5, [2, 1, 7, 5, 3]),
        (7, [2, 1, 7, 5, 3, 4, 6]),  # every distinct class of the batch
    ],
)
def test_hard_task_classes_failures_first_then_fill(way: int, expected: list[int]) -> None:
    out = hard_task_classes(ACC, LOSS, CLASSES, way)
    assert out.dtype == np.int64
    assert out.tolist() == expected


def test_hard_task_classes_keeps_the_hardest_failures_when_there_are_more_than_way() -> None:
    classes = np.array([[10, 11], [12, 13], [14, 15], [16, 17]])
    acc = table([0.5, 0.9], [0.9, 0.1], [0.3, 0.7], [0.8, 0.6])
    loss = np.ones_like(acc)
    assert failure_classes(acc, loss, classes).tolist() == [10, 13, 14, 17]
    assert hard_task_classes(acc, loss, classes, 2).tolist() == [13, 14]
    assert hard_task_classes(acc, loss, classes, 4).tolist() == [13, 14, 10, 17]
    # 15 (acc 0.7) is the hardest non-failure class; 11 and 12 (0.9) come later.
    assert hard_task_classes(acc, loss, classes, 5).tolist() == [13, 14, 10, 17, 15]


def test_hard_task_orders_equally_failed_classes_by_loss() -> None:
    classes = np.array([[1, 2], [3, 4]])
    acc = table([0.0, 1.0], [0.0, 1.0])
    loss = table([0.5, 0.0], [0.9, 0.0])
    assert hard_task_classes(acc, loss, classes, 2).tolist() == [3, 1]


def test_hard_task_classes_error_when_batch_has_too_few_distinct_classes() -> None:
    classes = np.array([[1, 2], [2, 1]])
    acc = table([0.5, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="only 2 distinct classes.*way=3"):
        hard_task_classes(acc, np.zeros_like(acc), classes, 3)
    with pytest.raises(ValueError, match="only 7 distinct classes.*way=8"):
        hard_task_classes(ACC, LOSS, CLASSES, 8)


@pytest.mark.parametrize(
    "acc,loss,classes",
    [
        (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2), dtype=np.int64)),
        (np.zeros((2, 3)), np.zeros((3, 2)), np.zeros((2, 3), dtype=np.int64)),
        (np.zeros(3), np.zeros(3), np.arange(3)),  # one task must still be [1, way]
    ],
)
def test_shape_mismatch_is_refused(acc: np.ndarray, loss: np.ndarray, classes: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\[T, way\] shape"):
        failure_classes(acc, loss, classes)
    with pytest.raises(ValueError, match=r"\[T, way\] shape"):
        hard_task_classes(acc, loss, classes, 2)


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    tasks = draw(st.integers(1, 4))
    way = draw(st.integers(2, 5))
    pool = draw(st.integers(way, 3 * way))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    classes = np.stack([rng.choice(pool, size=way, replace=False) for _ in range(tasks)])
    # Accuracies on a coarse grid (as with a few queries per class) so ties are common.
    acc = rng.integers(0, 4, size=(tasks, way)) / 3
    loss = rng.integers(0, 3, size=(tasks, way)).astype(np.float64)
    return acc, loss, classes, way


@settings(max_examples=150, deadline=None, database=None)  # no .hypothesis folder in the repo
@given(batches())
def test_hard_task_properties(batch: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
    acc, loss, classes, way = batch
    fails = failure_classes(acc, loss, classes)
    for t in range(len(fails)):
        pos = list(classes[t]).index(fails[t])
        # the failure class has the lowest accuracy, and among equals the highest loss
        assert acc[t, pos] == acc[t].min()
        assert loss[t, pos] == loss[t][acc[t] == acc[t].min()].max()
    out = hard_task_classes(acc, loss, classes, way).tolist()
    distinct_fails = list(dict.fromkeys(fails.tolist()))
    assert len(out) == len(set(out)) == way
    assert set(out) <= set(classes.ravel().tolist())
    k = min(way, len(distinct_fails))
    assert set(out[:k]) <= set(distinct_fails)  # failure classes come first
    if len(distinct_fails) <= way:
        assert set(distinct_fails) <= set(out)  # and none is dropped while there is room


def test_pooled_task_classes_draw_from_the_failures_at_random() -> None:
    # Four tasks failing on four distinct classes (10, 21, 32, 43): every 3-way draw stays in that pool,
    # and different generators give different draws.
    classes = np.array([[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 43]])
    acc = table([0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.2])
    loss = np.zeros_like(acc)
    rngs = [np.random.default_rng(s) for s in range(20)]
    draws = {tuple(d.tolist()) for d in pooled_task_classes(acc, loss, classes, 3, rngs)}
    assert all(len(set(d)) == 3 and set(d) <= {10, 21, 32, 43} for d in draws)
    assert len(draws) > 1
    (same,) = pooled_task_classes(acc, loss, classes, 3, [np.random.default_rng(5)])
    (again,) = pooled_task_classes(acc, loss, classes, 3, [np.random.default_rng(5)])
    assert same.tolist() == again.tolist()


def test_pooled_task_classes_fall_back_to_failures_then_fill_when_the_pool_is_small() -> None:
    rngs = [np.random.default_rng(0), np.random.default_rng(1)]
    out = pooled_task_classes(ACC, LOSS, CLASSES, 5, rngs)  # only 2 failure classes
    assert [o.tolist() for o in out] == [hard_task_classes(ACC, LOSS, CLASSES, 5).tolist()] * 2

"""Hard-task (HT) meta-batches: choose the classes the model just failed on and build tasks of them.

After the ordinary tasks of a meta-batch are learned, each task's lowest-accuracy class (ties broken
by the higher query loss) is its failure class. A hard task uses the batch's distinct failure
classes, hardest first; when there are fewer than `way` of them it is filled with the next-hardest
classes of the same batch, ranked by accuracy then loss. Its images are sampled afresh (none of the
learned tasks' support or query images), and its labels in random order
(`EpisodeSampler.episode_for_classes`), so label 0 is not always the hardest class.

The paper's variant (`meta.ht.pool_batches` > 1) pools the failure classes of several meta-batches and
draws each hard task's classes at random from that pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ranking(acc: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Flat indices of [T, way] entries from hardest to easiest: accuracy ascending, loss descending."""
    return np.lexsort((-loss.ravel(), acc.ravel()))


def failure_classes(acc: np.ndarray, loss: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The failure class of each task.

    acc, loss: [T, way] per-class query accuracy and mean loss; classes: [T, way] dataset class ids.
    Returns [T] class ids: per task, the lowest accuracy, ties going to the higher loss (then the
    earlier position).
    """
    _check(acc, loss, classes)
    out = np.empty(acc.shape[0], dtype=np.int64)
    for t in range(acc.shape[0]):
        out[t] = classes[t, _ranking(acc[t : t + 1], loss[t : t + 1])[0]]
    return out


def hard_task_classes(acc: np.ndarray, loss: np.ndarray, classes: np.ndarray, way: int) -> np.ndarray:
    """[way] distinct class ids for a hard task: failure classes (hardest first), then fill classes."""
    _check(acc, loss, classes)
    flat = classes.ravel()
    ranked = [int(flat[i]) for i in _ranking(acc, loss)]
    fails = set(failure_classes(acc, loss, classes).tolist())
    chosen: list[int] = []
    for c in [c for c in ranked if c in fails] + ranked:
        if c not in chosen:
            chosen.append(c)
        if len(chosen) == way:
            return np.asarray(chosen, dtype=np.int64)
    raise ValueError(f"the meta-batch holds only {len(chosen)} distinct classes; a hard task needs way={way}")


def pooled_task_classes(
    acc: np.ndarray, loss: np.ndarray, classes: np.ndarray, way: int, rngs: Sequence[np.random.Generator]
) -> list[np.ndarray]:
    """[way] distinct class ids for each hard task of the paper's pooled variant, one per generator:
    drawn at random from the distinct failure classes of the pooled tasks ([T, way] tables of several
    meta-batches); when the pool holds fewer than `way`, every task gets all of them and the
    next-hardest classes, as `hard_task_classes`. The pool is ranked once for all the tasks."""
    fails = np.unique(failure_classes(acc, loss, classes))
    if len(fails) < way:
        return [hard_task_classes(acc, loss, classes, way)] * len(rngs)
    return [rng.choice(fails, size=way, replace=False).astype(np.int64) for rng in rngs]


def _check(acc: np.ndarray, loss: np.ndarray, classes: np.ndarray) -> None:
    if not (acc.shape == loss.shape == classes.shape) or acc.ndim != 2:
        raise ValueError(
            f"acc, loss and classes must share one [T, way] shape; got {acc.shape}, {loss.shape}, {classes.shape}"
        )

"""Meta-testing a shipped model by name on its card's episodes, shared by the shipped-model tests."""

from __future__ import annotations

from pathlib import Path

import metatransfer
from metatransfer import pretrained
from metatransfer.config import build_config
from metatransfer.data.readers import with_data_root
from metatransfer.predict import meta_test_learner
from metatransfer.train.evaluate import confidence_interval


def meta_test_shipped(
    name: str, data_root: Path, episodes: int
) -> tuple[pretrained.ShippedModel, float, float]:
    """(the registry entry, mean accuracy, 95% CI half-width) of the model loaded by `name` on the first
    `episodes` episodes of its card's split, seed, way, shot and query, with data under `data_root`."""
    model = pretrained.registry()[name]
    learner = metatransfer.load(name)  # by name: resolved through the registry, sha256 checked
    data = with_data_root(build_config([{"data": model.data}]), data_root).data
    r = model.result
    accs = meta_test_learner(learner, data, r.split, r.way, r.shot, r.query, episodes, r.seed)
    mean, ci = confidence_interval(accs)
    return model, mean, ci

"""The trained models shipped in the package (`src/metatransfer/pretrained/`) against their cards.

Each registered model (and each of the four the project promises, so a missing one fails rather than
disappears) is loaded by name, its file's sha256 checked, and meta-tested on the shared real data over
the first 200 episodes of its card's split and seed: the card's accuracy must lie inside this
test's own 95% CI. The shipped files must total at most 40 MB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metatransfer import pretrained
from shipped import meta_test_shipped

PROMISED = ["mini-imagenet-32-1shot", "mini-imagenet-32-5shot", "omniglot-1shot", "omniglot-5shot"]
EPISODES = 200
MAX_TOTAL_BYTES = 40 * 10**6


@pytest.mark.parametrize("name", sorted(set(PROMISED) | set(pretrained.registry())))
def test_shipped_model_meets_its_card(name: str, shared_data: Path) -> None:
    models = pretrained.registry()
    assert name in models, f"{name} is not shipped yet: run benchmarks/ship_model.py on its finished run"
    model = models[name]
    assert pretrained.sha256(pretrained.FOLDER / model.file) == model.sha256
    model, mean, ci = meta_test_shipped(name, shared_data, EPISODES)
    r = model.result
    assert abs(r.accuracy - mean) <= ci, (
        f"{name}: card {100 * r.accuracy:.2f} % is outside this test's {100 * mean:.2f} ± {100 * ci:.2f} "
        f"({EPISODES} {r.split} episodes of seed {r.seed})"
    )


def test_at_least_four_models_are_shipped_within_40_mb() -> None:
    models = pretrained.registry()
    assert len(models) >= 4, f"{len(models)} shipped models ({sorted(models)}); the promise is {PROMISED}"
    files = [pretrained.FOLDER / m.file for m in models.values()]
    assert all(f.is_file() for f in files)
    total = sum(f.stat().st_size for f in files)
    assert total <= MAX_TOTAL_BYTES, f"shipped models total {total / 1e6:.1f} MB"

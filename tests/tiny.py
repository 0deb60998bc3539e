"""A tiny learnable image-folder dataset and config, shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SPLITS = {"train": 8, "val": 5, "test": 5}


def write_pattern_folder(root: Path, per_class: int = 12, size: int = 28, seed: int = 0) -> Path:
    """root/{train,val,test}/<class>/*.png: each class a fixed random blob pattern plus pixel noise,
    so a small network can learn features that transfer to unseen classes."""
    rng = np.random.default_rng(seed)
    for split, classes in SPLITS.items():
        for c in range(classes):
            base = (rng.random((7, 7)) > 0.5).astype(np.float32)
            pattern = np.kron(base, np.ones((4, 4), dtype=np.float32))
            folder = root / split / f"{split}-class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                shifted = np.roll(pattern, shift=tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
                img = np.clip(shifted * 200 + rng.normal(0, 30, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
    return root


def write_config(
    path: Path, data_root: Path, cache: Path, *, pretrain: dict | None = None, meta: dict | None = None
) -> Path:
    """A config for the tiny dataset; `pretrain` and `meta` update those sections."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "image-folder", "root": str(data_root), "size": 28, "cache_dir": str(cache)},
        "model": {"backbone": "conv4", "backbone_args": {"hidden": 8}},
        "pretrain": {
            "epochs": 3,
            "batch_size": 16,
            "lr": 0.05,
            "val_episodes": 20,
            "augment": {"enabled": True, "crop_scale": [0.8, 1.0], "flip": False, "color_jitter": 0.0},
            **(pretrain or {}),
        },
        "meta": {
            "way": 3,
            "query": 4,
            "meta_batch": 2,
            "tasks": 8,
            "inner_steps": 5,
            "inner_steps_test": 10,
            "val_every": 4,
            "val_episodes": 10,
            **(meta or {}),
        },
        "eval": {"split": "test", "ways": [3], "shots": [1], "query": 4, "episodes": 30},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path

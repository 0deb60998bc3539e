"""Classify a folder of images with a trained model, after showing it a few labelled examples.

    python examples/predict_folder.py MODEL SUPPORT_DIR QUERY_DIR

MODEL is a shipped model's name (`mtl models` lists them, e.g. mini-imagenet-32-5shot) or the path
of a `.mtl` file or meta-train run directory. SUPPORT_DIR holds one folder of images per class;
every image under QUERY_DIR is classified.
"""

from __future__ import annotations

import sys
from pathlib import Path

import metatransfer

IMAGES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGES)


def main(model: str, support: Path, query: Path) -> None:
    paths = [p for c in sorted(support.iterdir()) if c.is_dir() for p in images(c)]
    labels = [p.parent.name for p in paths]
    learner = metatransfer.load(model).fit(paths, labels)
    queries = images(query)
    for path, label in zip(queries, learner.predict(queries), strict=True):
        print(f"{path}\t{label}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))

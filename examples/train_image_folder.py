"""Train MTL on your own images and export the model, with the `mtl` commands.

    python examples/train_image_folder.py ROOT OUT [--set key=value ...]

ROOT is laid out as ROOT/{train,val,test}/<class>/*.jpg. The config is configs/mini-imagenet-32.yaml's
ResNet-12 at 32 px with the data section pointed at ROOT; extra `--set` overrides (e.g. a smaller
backbone or fewer epochs) pass through to `mtl run`. OUT receives the run and OUT/model.mtl.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mini-imagenet-32.yaml"


def mtl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "metatransfer", *args], check=True)


def main(root: str, out: str, overrides: list[str]) -> None:
    run = Path(out) / "run"
    data = ["--data-root", root, "--set", "data.dataset=image-folder"]
    mtl("run", "--config", str(CONFIG), *data, "--out", str(run), *overrides)
    shots = sorted(run.glob("meta-*shot"))  # one meta-training per shot in eval.shots
    mtl("export", str(shots[-1]), "--out", str(Path(out) / "model.mtl"))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

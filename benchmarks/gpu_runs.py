"""The GPU check's distributed section: ``mtl run`` (all three phases, a few steps each) under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gpu_sections import CONFIG, Check
from metatransfer.config import load_config, to_yaml


def write_folder(root: Path, size: int, classes: dict[str, int], per_class: int) -> Path:
    """A random ``image-folder`` dataset: root/<split>/<class>/<i>.png, ``classes[split]`` classes."""
    rng = np.random.default_rng(0)
    for split, count in classes.items():
        for c in range(count):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )
    return root


def dist_config(check: Check, tmp: Path, ranks: int) -> Path:
    """configs/mini-imagenet.yaml cut to a few steps of each phase (1 shot) on a small random image
    folder, written to tmp."""
    plan, net = check.plan, check.plan.net
    data = write_folder(tmp / "data", net.size, {"train": 8, "val": 5, "test": 5}, 20)
    batch = 16
    overrides = [
        "data.dataset=image-folder",
        f"data.root={data}",
        f"data.cache_dir={tmp / 'cache'}",
        f"data.size={net.size}",
        f"model.backbone={net.name}",
        f"model.backbone_args={dict(net.args) or {}}",
        "compile=false",  # compiling is measured in the one-process sections; here: the collectives
        "pretrain.epochs=1",
        f"pretrain.batch_size={batch}",
        f"pretrain.images_per_epoch={4 * batch * ranks}",  # 4 steps
        "pretrain.val_episodes=10",
        f"meta.meta_batch={max(4, ranks)}",
        f"meta.tasks={2 * max(4, ranks)}",  # 2 meta-batches (+ their hard tasks)
        f"meta.val_every={2 * max(4, ranks)}",
        "meta.val_episodes=10",
        f"meta.inner_steps={plan.meta_train.inner_steps}",
        f"meta.inner_steps_test={plan.meta_train.inner_steps}",
        "eval.shots=[1]",
        "eval.ways=[5]",
        "eval.episodes=10",
    ]
    if check.target.device == "cpu":
        overrides.append("device=cpu")
    path = tmp / "config.yaml"
    path.write_text(to_yaml(load_config(CONFIG, overrides)))
    return path


def torchrun(ranks: int, args: list[str], timeout: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "metatransfer",
        *args,
    ]
    env = {**os.environ, "MTL_DIST_TIMEOUT": str(timeout), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{args[0]} under torchrun did not finish within {timeout} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} under torchrun exited {done.returncode}: {done.stderr[-1500:]}")
    return {
        "seconds": time.perf_counter() - t0,
        "command": " ".join(["torchrun", f"--nproc_per_node={ranks}", "-m metatransfer", *args]),
    }


def distributed_section(check: Check) -> dict[str, Any]:
    """``mtl run`` (pre-training, meta-training, meta-test: a few steps each) under torchrun, one
    launch for all three phases so the start-up of the ranks is paid once."""
    cuda = check.target.device == "cuda"
    ranks = torch.cuda.device_count() if cuda else 2
    results: dict[str, Any] = {"ranks": ranks, "backend": "nccl" if cuda else "gloo"}
    if ranks < 2:
        # At world size 1 the project starts no process group, so nccl itself goes untested here.
        results["note"] = (
            f"{ranks} GPU: torchrun runs one rank and the project starts no process group; nccl not exercised"
        )
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        out = tmp / "run"
        args = ["run", "--config", str(dist_config(check, tmp, ranks)), "--out", str(out)]
        results.update(torchrun(ranks, args, check.plan.dist_timeout_s))
        files = {
            "pretrain": out / "pretrain" / "backbone.safetensors",
            "meta_train": out / "meta-1shot" / "model.safetensors",
            "meta_test": out / "meta-1shot" / "results.json",
        }
        for phase, path in files.items():
            results[phase] = (
                {"status": "measured", "wrote": path.name}
                if path.exists()
                else {"status": "failed", "error": f"finished without writing {path.name}"}
            )
    results["steps"] = {"pretrain": 4, "meta_train": 2, "meta_test_episodes": 10}
    return results

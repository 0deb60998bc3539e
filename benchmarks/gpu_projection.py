"""The projected wall time of ``mtl run --config configs/mini-imagenet.yaml`` on this device, from the
rates the other sections measured and the counts the config asks for."""

from __future__ import annotations

import math
from typing import Any

import torch

from fixtures import QUERY, random_store
from gpu_sections import CONFIG, Check, Skip
from metatransfer.config import load_config
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.train.evaluate import evaluate_features
from timing import seconds

# miniImageNet's split sizes (Ravi & Larochelle): 64 / 16 / 20 classes of 600 images.
MINI_IMAGENET = {"train": 38_400, "val": 9_600, "test": 12_000}
NEEDS = ("pretrain_images_per_s", "features_per_s", "linear_episodes_per_s", "meta_step_s")


def ncm_episodes_per_s(check: Check, images: int, shot: int, episodes: int) -> float:
    """Nearest-mean episodes/s (phase 1's validation) over stand-in features of the val split's shape."""
    dim = int(check.plan.net.build().out_dim)  # type: ignore[arg-type]
    classes = max(images // 600, 5)
    index = random_store(classes, images // classes, 1, 1, "val")  # the sampler needs only the class layout
    feats = torch.randn(len(index), dim)
    sampler = EpisodeSampler(index, 5, shot, QUERY, seed=0)
    return episodes / seconds(lambda: evaluate_features(feats, sampler, episodes, "ncm"), torch.device("cpu"))


def validations(tasks: int, meta_batch: int, every: int) -> int:
    """How many validations meta_train runs: one before training, then as its loop decides."""
    done = list(range(meta_batch, tasks + meta_batch, meta_batch))
    return 1 + sum(1 for t in done if t % every < meta_batch or t >= tasks)


def projection_section(check: Check) -> dict[str, Any]:
    m = check.measured
    missing = [k for k in NEEDS if k not in m]
    if missing:
        raise Skip(f"needs {', '.join(missing)}, which earlier sections did not measure")
    cfg = load_config(CONFIG)
    sizes = {**MINI_IMAGENET, **m.get("split_sizes", {})}
    p, meta, ev = cfg.pretrain, cfg.meta, cfg.eval
    feat, linear = m["features_per_s"], m["linear_episodes_per_s"]
    ncm = {s: ncm_episodes_per_s(check, sizes["val"], s, p.val_episodes) for s in p.val_shots}

    steps_per_epoch = max((p.images_per_epoch or sizes["train"]) // p.batch_size, 1)
    phases: dict[str, float] = {
        "pretrain_steps": p.epochs * steps_per_epoch * p.batch_size / m["pretrain_images_per_s"],
        "pretrain_validation": p.epochs
        * (sizes["val"] / feat + sum(p.val_episodes / r for r in ncm.values())),
    }
    steps = math.ceil(meta.tasks / meta.meta_batch)
    vals = validations(meta.tasks, meta.meta_batch, meta.val_every)
    notes = []
    for shot in ev.shots:
        step_s = m["meta_step_s"].get(shot)
        if step_s is None:
            step_s = m["meta_step_s"][1]
            notes.append(f"{shot}-shot meta-training step not measured: the 1-shot step time stands in")
        hard = steps * step_s if meta.ht.enabled else 0.0  # a hard-task step counted as a whole meta-batch's
        phases[f"meta_train_{shot}shot"] = steps * step_s + hard + m.get("meta_warm_up_s", {}).get(shot, 0.0)
        phases[f"meta_validation_{shot}shot"] = vals * (sizes["val"] / feat + meta.val_episodes / linear)
        phases[f"meta_test_{shot}shot"] = sizes["test"] / feat + len(ev.ways) * ev.episodes / linear
    total = sum(phases.values())
    return {
        "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "total_hours": total / 3600,
        "phases_hours": {k: v / 3600 for k, v in phases.items()},
        "counts": {
            "pretrain_images": p.epochs * steps_per_epoch * p.batch_size,
            "pretrain_validations": p.epochs,
            "meta_steps_per_shot": steps,
            "hard_task_steps_per_shot": steps if meta.ht.enabled else 0,
            "meta_validations_per_shot": vals,
            "shots": list(ev.shots),
        },
        "rates": {
            "pretrain_images_per_s": m["pretrain_images_per_s"],
            "pretrain_rate_from": m.get("pretrain_rate_from"),
            "features_per_s": feat,
            "linear_episodes_per_s": linear,
            "ncm_episodes_per_s": ncm,
            "meta_step_s": m["meta_step_s"],
        },
        "split_sizes": sizes,
        "assumptions": [
            "hard-task steps (1 task each) cost as much as a whole meta-batch step (an upper bound)",
            "not counted: building the data cache, process start-up, checkpoint writes",
            *notes,
        ],
    }

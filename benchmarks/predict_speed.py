"""Repeated predicts after one fit: the adapted classifier kept (now) against re-adapting on every call (before).

Usage: ``python benchmarks/predict_speed.py [--model NAME_OR_PATH] [--calls 10] [--way 5] [--shot 5]
[--queries 75] [--rounds 3]``.

Without --model, a model of configs/mini-imagenet-32.yaml's architecture and settings (ResNet-12 at 32 px,
25 inner steps) with random weights is written to a temporary folder: speed does not depend on the
weights. "now" is `FewShotLearner.predict` after one `fit`; "before" is what predict did until it kept
the classifier: the queries' features, then `train.evaluate.classify`, which adapts the base learner
on the support features again. Both run the library's own code; each is timed over --calls calls, the
best of --rounds rounds, after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metatransfer.config import load_config
from metatransfer.data.preprocess import Preprocess
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, inner_loop, prepare_backbone
from metatransfer.models.model_files import MODEL_FILE, save_meta_model
from metatransfer.predict import FewShotLearner, load
from metatransfer.runs import CONFIG_FILE
from metatransfer.train.evaluate import classify

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mini-imagenet-32.yaml"


def random_model(folder: Path) -> Path:
    """A meta-train run folder holding CONFIG's model with random weights."""
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    backbone = create_backbone(cfg.model.backbone, 3, **cfg.model.backbone_args)
    prepare_backbone(backbone, cfg.meta)
    pre = Preprocess(cfg.data.size, 3, (0.5,) * 3, (0.25,) * 3)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(CONFIG.read_text())
    save_meta_model(folder / MODEL_FILE, MetaLearner(backbone, cfg.meta.way), cfg, pre)
    return folder


def seconds(call: Callable[[], object], calls: int, rounds: int) -> float:
    call()  # warm-up: first-call allocations and kernel choices
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, time.perf_counter() - t0)
    return best


def readapting_predict(
    learner: FewShotLearner, support: np.ndarray, labels: list[int]
) -> Callable[[np.ndarray], list]:
    """predict as it was: the support's features kept from fit, the base learner adapted again per call."""
    xs = learner.features(support)[None]
    ys = torch.tensor(labels)[None]
    way = len(set(labels))
    loop = inner_loop(learner.meta, test=True)

    def predict(queries: np.ndarray) -> list:
        with torch.no_grad():
            scores = classify(
                xs, ys, learner.features(queries)[None], way, "linear", loop, learner.model.frozen_init(way)
            )
        return [learner.classes[int(i)] for i in scores[0].argmax(-1)]

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model", help="a shipped name, .mtl file or run (default: a random mini-imagenet-32 model)"
    )
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--queries", type=int, default=75)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        learner = load(args.model or random_model(Path(tmp) / "run"), device="cpu")
    rng = np.random.default_rng(0)
    shape = (learner.pre.size, learner.pre.size, learner.pre.channels)
    support = rng.integers(0, 256, (args.way * args.shot, *shape), dtype=np.uint8)
    queries = rng.integers(0, 256, (args.queries, *shape), dtype=np.uint8)
    labels = [i // args.shot for i in range(len(support))]
    learner.fit(support, labels)  # sorted by class already, so fit's canonical order matches `labels`
    before = readapting_predict(learner, learner.to_arrays(support), labels)
    assert before(queries) == learner.predict(queries), "both paths must classify alike"
    now_s = seconds(lambda: learner.predict(queries), args.calls, args.rounds)
    before_s = seconds(lambda: before(queries), args.calls, args.rounds)
    report = {
        "model": learner.source if args.model else f"random weights, {CONFIG.name} architecture",
        "precision": learner.runtime.precision,
        "threads": torch.get_num_threads(),
        "calls": args.calls,
        "queries_per_call": args.queries,
        "support": f"{args.way}-way {args.shot}-shot",
        "inner_steps_test": learner.meta.inner_steps_test,
        "seconds_readapting_each_call": round(before_s, 4),
        "seconds_adapted_once": round(now_s, 4),
        "speedup": round(before_s / now_s, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

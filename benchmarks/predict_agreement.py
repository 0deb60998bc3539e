"""Does `mtl predict` agree with `mtl meta-test`? Fixed episodes written out as folders.

Usage: ``python benchmarks/predict_agreement.py RUN_DIR [--episodes 20] [--way 5] [--shot 1] [--query 15]
[--split test] [--data-root DIR] [--fp16] --out benchmarks/results/predict``.

For each episode the support images go to ``support/<label>_<class>/`` and the queries to
``query/``, exactly as a user would lay them out; `mtl predict` runs on the exported model as a
separate process (timed end to end, imports included) and its top class is compared with the class
meta-test's batched inner loop gives the same query over the same episode, with the run's own model.
`measure` is also what `benchmarks/ship_model.py` records for a shipped model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metatransfer.config import load_config
from metatransfer.data.readers import with_data_root
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import open_split
from metatransfer.device import resolve_runtime
from metatransfer.models.meta_learner import inner_loop
from metatransfer.models.model_files import MODEL_FILE, load_meta_model
from metatransfer.predict import export_model
from metatransfer.train.evaluate import classify, episode_labels, extract_features


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def measure(
    run: Path,
    model: Path,
    out: Path,
    *,
    split: str,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """`mtl predict` on the model file `model` against meta-test on the run `run`, over `episodes` episodes
    (seed: the run's eval.seed) written under `out` (replaced). Returns the report (also out/agreement.json):
    agree, queries, episodes, split, seed, precision (meta-test's, which predict uses by default), timings."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(run / "config.yaml")
    if data_root:
        cfg = with_data_root(cfg, data_root)
    seed = cfg.eval.seed if seed is None else seed
    store = open_split(cfg.data, split, progress=False)
    sampler = EpisodeSampler(store, way, shot, query, seed)
    learner, pre, meta = load_meta_model(run / MODEL_FILE)
    runtime = resolve_runtime(cfg)
    runtime.model(learner)
    chosen = [sampler.episode(i) for i in range(episodes)]
    rows = np.unique(np.concatenate([np.concatenate([e.support, e.query]) for e in chosen]))
    feats = torch.zeros(len(store), int(learner.backbone.out_dim))  # type: ignore[arg-type]
    feats[torch.from_numpy(rows)] = extract_features(
        learner.backbone, store, runtime, pre.mean, pre.std, indices=rows
    )
    same = total = 0
    seconds = []
    for i, e in enumerate(chosen):
        xs, xq = feats[torch.from_numpy(e.support)][None], feats[torch.from_numpy(e.query)][None]
        ys = episode_labels(way, shot, 1)
        scores = classify(xs, ys, xq, way, "linear", inner_loop(meta, test=True), learner.frozen_init(way))
        expected = scores[0].argmax(-1).numpy()
        folder = out / f"episode{i:02d}"
        for j, idx in enumerate(e.support):
            label = j // shot  # folder names sort in label order, as meta-test numbers the classes
            name = f"{label}_{store.classes[e.classes[label]].replace('/', '_')}"
            _save(store.images[idx], folder / "support" / name / f"{j}.png")
        for k, idx in enumerate(e.query):
            _save(store.images[idx], folder / "query" / f"{k:03d}.png")
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "metatransfer", "predict", str(model), "--json"]
            + ["--support", str(folder / "support"), "--query", str(folder / "query")],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds.append(time.perf_counter() - t0)
        answers = json.loads(done.stdout)
        predicted = np.array(
            [int(a["class"].split("_")[0]) for a in sorted(answers, key=lambda a: a["file"])]
        )
        same += int((predicted == expected).sum())
        total += len(expected)
    report = {
        "agree": same,
        "queries": total,
        "episodes": episodes,
        "split": split,
        "seed": seed,
        "precision": runtime.precision,
        "agreement": same / total,
        "predict_seconds_mean": float(np.mean(seconds)),
        "predict_seconds_max": float(np.max(seconds)),
    }
    (out / "agreement.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, help="episode seed (default: the run's eval.seed)")
    parser.add_argument("--data-root")
    parser.add_argument("--fp16", action="store_true", help="export with fp16 storage")
    parser.add_argument("--out", default="benchmarks/results/predict")
    args = parser.parse_args(argv)
    run, out = Path(args.run_dir), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = export_model(run, out.parent / f"{out.name}-model.mtl", overwrite=True, fp16=args.fp16)
    report = measure(
        run,
        model,
        out,
        split=args.split,
        way=args.way,
        shot=args.shot,
        query=args.query,
        episodes=args.episodes,
        seed=args.seed,
        data_root=args.data_root,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

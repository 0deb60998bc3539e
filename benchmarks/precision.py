"""Does the fast path cost accuracy? The same pre-training in fp32 and in bf16 (+ channels_last).

Usage: ``python benchmarks/precision.py --config configs/omniglot.yaml --data-root ../shared/data
[--epochs 3] [--episodes 2000] --out benchmarks/results/precision``.

Both runs use the same config and seed; only `precision` (and channels_last) differ. Each backbone is
then scored by nearest class mean on the same fixed val episodes, 5-way 1-shot and 5-shot, and the
table says whether the two accuracies lie within each other's 95% confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metatransfer.config import load_config
from metatransfer.data.readers import with_data_root
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import open_split
from metatransfer.device import resolve_runtime
from metatransfer.models.model_files import load_backbone
from metatransfer.train.evaluate import confidence_interval, evaluate_features, extract_features
from metatransfer.train.pretrain import pretrain

VARIANTS = {
    "fp32": ["precision=fp32", "channels_last=false"],
    "bf16": ["precision=bf16", "channels_last=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/precision")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for name, overrides in VARIANTS.items():
        cfg = load_config(args.config, [*overrides, f"pretrain.epochs={args.epochs}"])
        cfg = with_data_root(cfg, args.data_root)
        t0 = time.perf_counter()
        path = pretrain(cfg, out / name, overwrite=True)
        seconds = time.perf_counter() - t0
        backbone, pre, _ = load_backbone(path)
        runtime = resolve_runtime(cfg)
        runtime.model(backbone)
        val = open_split(cfg.data, "val", progress=False)
        feats = extract_features(backbone, val, runtime, pre.mean, pre.std)
        row: dict[str, object] = {"variant": name, "pretrain_s": round(seconds, 1)}
        for shot in (1, 5):
            sampler = EpisodeSampler(val, 5, shot, 15, cfg.eval.seed)
            mean, ci = confidence_interval(evaluate_features(feats, sampler, args.episodes, "ncm"))
            row[f"{shot}shot"], row[f"{shot}shot_ci"] = mean, ci
        rows.append(row)
        print(row, flush=True)
    lines = [
        "| precision | pre-training time (s) | val 5-way 1-shot (%) | val 5-way 5-shot (%) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['pretrain_s']} | {100 * r['1shot']:.2f} ± {100 * r['1shot_ci']:.2f} | "  # type: ignore[operator]
            f"{100 * r['5shot']:.2f} ± {100 * r['5shot_ci']:.2f} |"  # type: ignore[operator]
        )
    a, b = rows
    overlap = all(
        abs(a[f"{s}shot"] - b[f"{s}shot"]) <= max(a[f"{s}shot_ci"], b[f"{s}shot_ci"])  # type: ignore[operator]
        for s in (1, 5)
    )
    lines.append(
        f"\nwithin each other's 95% CI: {'yes' if overlap else 'NO'} ({args.epochs} epochs, {args.episodes} episodes)"
    )
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    (out / "precision.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

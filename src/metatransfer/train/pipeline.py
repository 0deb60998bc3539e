"""`mtl run`: all three phases end to end (meta-training and meta-test once per shot), with a summary table
that sets each result beside nearest class mean on the phase-1 features, paired on the same episodes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from metatransfer import distributed as dist
from metatransfer.config import Config
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.report import write_report
from metatransfer.runs import atomic_write_text, claim_folder, folder_lock, write_json
from metatransfer.train.baselines import phase_one_features
from metatransfer.train.evaluate import evaluate_features, format_delta, paired_difference
from metatransfer.train.loop import reuse_finished
from metatransfer.train.meta import meta_train
from metatransfer.train.meta_test import TestResult, TestSetting, meta_test
from metatransfer.train.pretrain import pretrain


def run_all(cfg: Config, out: Path, *, overwrite: bool = False) -> list[TestResult]:
    """`mtl run`: pre-train, then per shot in eval.shots meta-train and meta-test; prints a summary table."""
    t0 = time.perf_counter()
    pre_dir = out / "pretrain"
    if not reuse_finished(pre_dir, cfg, "pretrain", overwrite=overwrite):
        pretrain(cfg, pre_dir, overwrite=overwrite)
    results: list[TestResult] = []
    for shot in cfg.eval.shots:
        shot_cfg = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, shot=shot))
        meta_dir = out / f"meta-{shot}shot"
        if not reuse_finished(meta_dir, shot_cfg, "meta", overwrite=overwrite):
            meta_train(shot_cfg, pre_dir, meta_dir, overwrite=overwrite)
        settings = [
            TestSetting(cfg.eval.split, way, shot, cfg.eval.query, cfg.eval.episodes, cfg.eval.seed)
            for way in cfg.eval.ways
        ]
        results += meta_test(meta_dir, settings, shot_cfg)
    if dist.context().is_main:
        ncm = ncm_reference(cfg, pre_dir, results)
        deltas = [paired_difference(r.accuracies, n) for r, n in zip(results, ncm, strict=True)]
        table = summary_table(results, ncm, deltas, time.perf_counter() - t0)
        print(table)
        # The top folder is ours too: marked (so its files are listed) and written only under its lock.
        with folder_lock(claim_folder(out, data_root=cfg.data.root), "run"):
            atomic_write_text(out / "summary.md", table + "\n")
            write_json(
                out / "summary.json",
                [
                    {
                        **dataclasses.asdict(r.setting),
                        "accuracy": r.accuracy,
                        "ci95": r.ci95,
                        "selection_seed": r.selection_seed,
                        "ncm_accuracy": float(n.mean()),
                        "delta_vs_ncm": delta,
                        "delta_vs_ncm_ci95": ci,
                    }
                    for r, n, (delta, ci) in zip(results, ncm, deltas, strict=True)
                ],
            )
            report = write_report(out)
        print(f"report: {report}")
    return results


def ncm_reference(cfg: Config, pretrained: Path, results: list[TestResult]) -> list[np.ndarray]:
    """Per-episode accuracies [episodes] of nearest class mean on the phase-1 features, on each result's
    episodes: what phase 2 has to beat (the same reference as `mtl ablate`'s "Δ vs NCM")."""
    f = phase_one_features(cfg, pretrained)
    return [
        evaluate_features(f.feats, EpisodeSampler(f.store, s.way, s.shot, s.query, s.seed), s.episodes, "ncm")
        for s in (r.setting for r in results)
    ]


def summary_table(
    results: list[TestResult], ncm: list[np.ndarray], deltas: list[tuple[float, float]], seconds: float
) -> str:
    lines = [
        "| split | way | shot | episodes | accuracy (%) | 95% CI | NCM (%) | Δ vs NCM (paired 95% CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, n, delta in zip(results, ncm, deltas, strict=True):
        s = r.setting
        lines.append(
            f"| {s.split} | {s.way} | {s.shot} | {s.episodes} | {100 * r.accuracy:.2f} | ± {100 * r.ci95:.2f} "
            f"| {100 * n.mean():.2f} | {format_delta(*delta)} |"
        )
    if results:
        lines.append(
            f"\nreported episodes: seed {results[0].setting.seed}; epoch and checkpoint chosen on val "
            f"episodes of seed {results[0].selection_seed}"
        )
    lines.append(f"\ntotal time: {seconds / 60:.1f} min")
    return "\n".join(lines)

"""`mtl run`: all three phases end to end (meta-training and meta-test once per shot), with a summary table."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from metatransfer import distributed as dist
from metatransfer.config import Config
from metatransfer.report import write_report
from metatransfer.runs import atomic_write_text, is_finished, write_json
from metatransfer.train.meta import meta_train
from metatransfer.train.meta_test import TestResult, TestSetting, meta_test
from metatransfer.train.pretrain import pretrain


def run_all(cfg: Config, out: Path, *, overwrite: bool = False) -> list[TestResult]:
    """`mtl run`: pre-train, then per shot in eval.shots meta-train and meta-test; prints a summary table."""
    t0 = time.perf_counter()
    pre_dir = out / "pretrain"
    if overwrite or not is_finished(pre_dir, cfg):
        pretrain(cfg, pre_dir, overwrite=overwrite)
    results: list[TestResult] = []
    for shot in cfg.eval.shots:
        shot_cfg = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, shot=shot))
        meta_dir = out / f"meta-{shot}shot"
        if overwrite or not is_finished(meta_dir, shot_cfg):
            meta_train(shot_cfg, pre_dir, meta_dir, overwrite=overwrite)
        settings = [
            TestSetting(cfg.eval.split, way, shot, cfg.eval.query, cfg.eval.episodes, cfg.eval.seed)
            for way in cfg.eval.ways
        ]
        results += meta_test(meta_dir, settings, shot_cfg)
    if dist.context().is_main:
        table = summary_table(results, time.perf_counter() - t0)
        print(table)
        atomic_write_text(out / "summary.md", table + "\n")
        write_json(
            out / "summary.json",
            [
                {
                    **dataclasses.asdict(r.setting),
                    "accuracy": r.accuracy,
                    "ci95": r.ci95,
                    "selection_seed": r.selection_seed,
                }
                for r in results
            ],
        )
        print(f"report: {write_report(out)}")
    return results


def summary_table(results: list[TestResult], seconds: float) -> str:
    lines = [
        "| split | way | shot | episodes | accuracy (%) | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.setting
        lines.append(
            f"| {s.split} | {s.way} | {s.shot} | {s.episodes} | {100 * r.accuracy:.2f} | ± {100 * r.ci95:.2f} |"
        )
    if results:
        lines.append(
            f"\nreported episodes: seed {results[0].setting.seed}; epoch and checkpoint chosen on val "
            f"episodes of seed {results[0].selection_seed}"
        )
    lines.append(f"\ntotal time: {seconds / 60:.1f} min")
    return "\n".join(lines)

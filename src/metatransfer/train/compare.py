"""Paired comparisons of meta-trained models on identical episodes.

`mtl compare-ht`: the same meta-training with and without hard-task meta-batches (paper, Figure 4).
Both runs start from the same phase-1 weights and seed and end at the same total number of tasks
(ordinary + hard), so the HT run sees fewer ordinary tasks. The validation curve of each is plotted
against the number of tasks learned, and both final models are meta-tested on identical episodes.

`mtl compare RUN_A [RUN_B ...] REFERENCE`: finished meta-train runs meta-tested on the same episodes,
and each one's per-episode difference from the last with its 95% CI (a sweep's arms against the
default in one command); `--curves` overlays their validation curves.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from metatransfer.config import Config
from metatransfer.errors import UserError
from metatransfer.runs import atomic_write_bytes, atomic_write_text, claim_folder, folder_lock
from metatransfer.train.evaluate import format_delta, paired_difference
from metatransfer.train.loop import reuse_finished
from metatransfer.train.meta import meta_train
from metatransfer.train.meta_test import TestResult, TestSetting, meta_test

VARIANTS = ("no-ht", "ht")


def variant_config(cfg: Config, variant: str) -> Config:
    """The config of one arm: HT off, or HT on with ordinary tasks cut so the total matches."""
    m = cfg.meta
    if variant == "no-ht":
        return dataclasses.replace(
            cfg, meta=dataclasses.replace(m, ht=dataclasses.replace(m.ht, enabled=False))
        )
    per_batch = m.meta_batch + m.ht.tasks_per_batch
    ordinary = m.tasks * m.meta_batch // per_batch
    ordinary -= ordinary % m.meta_batch
    ht = dataclasses.replace(m.ht, enabled=True, start_after=0)
    return dataclasses.replace(cfg, meta=dataclasses.replace(m, tasks=ordinary, ht=ht))


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(ordinary + hard tasks, val accuracy) points from a meta-training run's metrics.csv."""
    with (run_dir / "metrics.csv").open(newline="", encoding="utf-8") as f:
        return [
            (int(float(r["tasks"])) + int(float(r.get("hard_tasks") or 0)), float(r["val_acc"]))
            for r in csv.DictReader(f)
            if r.get("val_acc")
        ]


def compare_ht(
    cfg: Config, pretrained: Path, out: Path, *, overwrite: bool = False
) -> dict[str, list[TestResult]]:
    """Train both arms into out/no-ht and out/ht, then write curve.csv, curve.png and comparison.md."""
    curves: dict[str, list[tuple[int, float]]] = {}
    results: dict[str, list[TestResult]] = {}
    for variant in VARIANTS:
        vcfg = variant_config(cfg, variant)
        run_dir = out / variant
        if not reuse_finished(run_dir, vcfg, "meta", overwrite=overwrite):
            meta_train(vcfg, pretrained, run_dir, overwrite=overwrite)
        curves[variant] = read_curve(run_dir)
        settings = [
            TestSetting(cfg.eval.split, way, vcfg.meta.shot, cfg.eval.query, cfg.eval.episodes, cfg.eval.seed)
            for way in cfg.eval.ways
        ]
        results[variant] = meta_test(run_dir, settings, vcfg)
    lines = ["variant,tasks,val_acc"] + [f"{v},{t},{a:.6f}" for v in VARIANTS for t, a in curves[v]]
    png = plot_curves(curves, f"{cfg.name}: {cfg.meta.way}-way {cfg.meta.shot}-shot")
    table = [
        "| variant | tasks (ordinary + hard) | accuracy (%) | 95% CI | setting |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        total = curves[v][-1][0] if curves[v] else 0
        for r in results[v]:
            table.append(f"| {v} | {total} | {100 * r.accuracy:.2f} | ± {100 * r.ci95:.2f} | {_setting(r)} |")
    for with_ht, without in zip(results["ht"], results["no-ht"], strict=True):
        delta = format_delta(*paired_difference(with_ht.accuracies, without.accuracies))
        table.append(f"| HT − no HT (paired 95% CI) | | {delta} | | {_setting(with_ht)} |")
    # The top folder is ours too: marked (so its files are listed) and written only under its lock.
    with folder_lock(claim_folder(out, data_root=cfg.data.root), "compare-ht"):
        atomic_write_text(out / "curve.csv", "\n".join(lines) + "\n")
        atomic_write_bytes(out / "curve.png", png)
        atomic_write_text(out / "comparison.md", "\n".join(table) + "\n")
    print("\n".join(table))
    return results


def _setting(r: TestResult) -> str:
    s = r.setting
    return (
        f"{s.split}, {s.episodes} episodes of seed {s.seed}, {s.way}-way {s.shot}-shot; "
        f"checkpoints chosen on seed {r.selection_seed}"
    )


def compare_runs(
    runs: list[tuple[Path, Config]], setting: TestSetting
) -> tuple[list[TestResult], list[tuple[float, float]]]:
    """Meta-test every run on the same episodes: (their results, and for each run but the last, the mean of
    run - last and its paired 95% CI)."""

    def data(c: Config) -> tuple[str, str | None, bool]:
        return c.data.dataset, c.data.scheme, c.data.rotations  # what decides the episodes

    first, first_cfg = runs[0]
    for run, c in runs[1:]:
        if data(c) != data(first_cfg):
            raise UserError(
                f"{first} and {run} were trained on different data ({first_cfg.data.dataset} vs "
                f"{c.data.dataset}); a paired comparison needs the same episodes"
            )
    results = [meta_test(run, [setting], cfg, progress=False)[0] for run, cfg in runs]
    ref = results[-1].accuracies
    return results, [paired_difference(r.accuracies, ref) for r in results[:-1]]


def plot_curves(curves: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """PNG bytes of val accuracy against tasks learned, one line per variant."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 3  # a sweep: the legend goes beside the axes, where it hides no line
    fig, ax = plt.subplots(figsize=(9.5 if many else 6, 4), dpi=120)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [100 * y for y in ys], marker="o", label=name)
    ax.set_xlabel("meta-training tasks (ordinary + hard)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

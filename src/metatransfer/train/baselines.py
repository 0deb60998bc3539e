"""`mtl ablate`: every way of adapting one pre-trained backbone, on identical evaluation episodes.

Non-meta rows adapt per episode from the phase-1 features (nearest class mean, L2-normalised logistic
regression, a fresh linear classifier, or fine-tuning the whole network); meta rows meta-train with
the same seed and task budget (`ft-theta`, `ft-last`, `ss-last`, `mtl`, `mtl-ht`) and are
meta-tested like `mtl meta-test`. A method that fails gets its row with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.config import Config, DataConfig, Method, check_value, choices
from metatransfer.data.augment import to_float
from metatransfer.data.preprocess import Preprocess
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import ImageStore, open_split
from metatransfer.device import Runtime, resolve_runtime
from metatransfer.errors import TrainingError, UserError
from metatransfer.models.base_learner import InnerLoop
from metatransfer.models.meta_learner import MetaLearner, inner_loop
from metatransfer.models.model_files import BACKBONE_FILE, MODEL_FILE, load_backbone, load_meta_model
from metatransfer.progress import track
from metatransfer.runs import atomic_write_text, claim_folder, folder_lock, read_json
from metatransfer.train.evaluate import (
    confidence_interval,
    episode_labels,
    evaluate_features,
    extract_features,
    format_delta,
    paired_difference,
)
from metatransfer.train.loop import reuse_finished
from metatransfer.train.meta import kept_tasks, meta_train
from metatransfer.train.meta_test import TestSetting, meta_test

# Every meta.method, fewest adapted parameters first, then mtl with hard tasks.
META_METHODS = (*reversed(choices(Method)), "mtl-ht")
# base-learner: the config's own base learner (classifier_init, inner_steps_test, inner_lr) with theta = 0
# on the phase-1 features, i.e. what meta-training starts from.
FEATURE_METHODS = ("ncm", "logreg", "update-theta", "base-learner")
METHODS = ("update-theta", "update-all", "base-learner", *META_METHODS, "ncm", "logreg")
# The grid `update-theta` picks its inner loop from, on episodes disjoint from the reported ones.
THETA_GRID = [(steps, lr) for steps in (20, 50, 100) for lr in (0.1, 0.5, 1.0)]


@dataclass
class Row:
    method: str
    shot: int
    trainable: int = 0
    tasks: int = 0
    seconds: float = 0.0
    accuracy: float = float("nan")
    ci95: float = float("nan")
    episodes: int = 0
    error: str = ""
    kept: int = -1  # meta rows: tasks learned when the kept (best on val) model was saved; 0 = the start
    delta: float = float("nan")  # accuracy - NCM's on the same episodes (paired)
    delta_ci: float = float("nan")  # half-width of the paired difference's 95% CI
    accuracies: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0), repr=False)


def _loop(cfg: Config, steps: int, lr: float, weight_decay: float = 0.0) -> InnerLoop:
    m = cfg.meta
    return InnerLoop(steps, lr, m.temperature, m.normalize_features, weight_decay)


def logreg_loop(cfg: Config) -> InnerLoop:
    """L2-regularised logistic regression on normalised features (Tian et al. 2020), run to near convergence."""
    return _loop(cfg, steps=200, lr=0.5, weight_decay=1e-3)


def choose_theta_loop(cfg: Config, val_feats: torch.Tensor, val: ImageStore, shot: int) -> InnerLoop:
    """Pick (steps, lr) for a fresh linear classifier on 200 val episodes of the selection seed
    (`eval.selection_seed`): never the evaluation split's classes, never the reported episodes."""
    zero = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, classifier_init="zero"))
    grid = [(steps, lr, cfg.meta.temperature) for steps, lr in THETA_GRID]
    points = tune_base_learner(zero, val_feats, val, [shot], grid, 200)
    # Ties go to more steps, then the larger lr.
    best = max(points, key=lambda p: (p.accuracy[shot], p.steps, p.lr))
    return _loop(cfg, best.steps, best.lr)


@dataclass(frozen=True)
class GridPoint:
    """One inner-loop setting scored on val selection episodes (accuracy per shot)."""

    steps: int
    lr: float
    temperature: float
    accuracy: dict[int, float]


def tune_base_learner(
    cfg: Config,
    val_feats: torch.Tensor,
    val: ImageStore,
    shots: list[int],
    grid: list[tuple[int, float, float]],
    episodes: int,
) -> list[GridPoint]:
    """Score the config's base learner (its classifier_init, theta = 0) for every (steps, lr, temperature)
    of `grid` on `episodes` val episodes of `eval.selection_seed`, per shot: the episodes that may choose."""
    way, query, seed = cfg.eval.ways[0], cfg.eval.query, cfg.eval.selection_seed
    samplers = {shot: EpisodeSampler(val, way, shot, query, seed) for shot in shots}
    points = []
    for steps, lr, temperature in grid:
        meta = dataclasses.replace(cfg.meta, inner_steps_test=steps, inner_lr=lr, temperature=temperature)
        loop = inner_loop(meta, test=True)
        acc = {
            shot: float(evaluate_features(val_feats, sampler, episodes, "linear", loop=loop).mean())
            for shot, sampler in samplers.items()
        }
        points.append(GridPoint(steps, lr, temperature, acc))
    return points


@dataclass
class PhaseOneFeatures:
    """A phase-1 backbone (eval mode, on the config's device) and its features [N, d] of the evaluation
    split (`store`, `feats`) and of val (`val`, `val_feats`: the same objects when eval.split is val).
    Val's are computed on first use: only the rows that choose something need them."""

    source: Path
    backbone: nn.Module
    pre: Preprocess
    runtime: Runtime
    data: DataConfig
    split: str
    store: ImageStore
    feats: torch.Tensor

    @cached_property
    def val(self) -> ImageStore:
        return self.store if self.split == "val" else open_split(self.data, "val")

    @cached_property
    def val_feats(self) -> torch.Tensor:
        if self.split == "val":
            return self.feats
        return extract_features(
            self.backbone, self.val, self.runtime, self.pre.mean, self.pre.std, progress=True
        )


def phase_one_features(cfg: Config, pretrained: Path) -> PhaseOneFeatures:
    """Load the backbone of a phase-1 run (or file) and compute the features of the evaluation split the
    rows adapt on; val's follow when asked for, since choices are made on val whatever split is reported."""
    runtime = resolve_runtime(cfg)
    source = pretrained / BACKBONE_FILE if pretrained.is_dir() else pretrained
    backbone, pre, _ = load_backbone(source)
    runtime.model(backbone)
    data = dataclasses.replace(cfg.data, size=pre.size)
    store = open_split(data, cfg.eval.split)
    feats = extract_features(backbone, store, runtime, pre.mean, pre.std, progress=True)
    return PhaseOneFeatures(source, backbone, pre, runtime, data, cfg.eval.split, store, feats)


def tune_and_report(
    cfg: Config,
    pretrained: Path,
    out: Path,
    shots: list[int],
    grid: list[tuple[int, float, float]],
    episodes: int,
) -> str:
    """`mtl tune-base-learner`: choose the base learner's (steps, lr, temperature) on val selection
    episodes, then report the chosen setting and NCM on the report episodes of eval.split with their paired
    difference. Writes out/tune.csv (the grid) and out/tune.md (the report); returns the report."""
    f = phase_one_features(cfg, pretrained)
    points = tune_base_learner(cfg, f.val_feats, f.val, shots, grid, episodes)
    lines = ["steps,lr,temperature," + ",".join(f"val_{s}shot" for s in shots)]
    lines += [
        f"{p.steps},{p.lr},{p.temperature}," + ",".join(f"{p.accuracy[s]:.6f}" for s in shots) for p in points
    ]
    atomic_write_text(out / "tune.csv", "\n".join(lines) + "\n")
    split, store, feats = cfg.eval.split, f.store, f.feats
    report = [
        f"Base learner ({cfg.meta.classifier_init} init, theta = 0) on the phase-1 features of {f.source}.",
        f"Chosen on {episodes} val episodes of seed {cfg.eval.selection_seed} from {len(grid)} settings; "
        f"reported on {cfg.eval.episodes} {split} episodes of seed {cfg.eval.seed}.",
        "",
        "| shot | chosen (steps, lr, temperature) | selection acc (%) | NCM (%) | base learner (%) | "
        "Δ vs NCM (paired 95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for shot in shots:
        # Ties go to the fewest steps: the cheapest setting that scores as well.
        best = max(points, key=lambda p: (round(p.accuracy[shot], 6), -p.steps))
        sampler = EpisodeSampler(store, cfg.eval.ways[0], shot, cfg.eval.query, cfg.eval.seed)
        meta = dataclasses.replace(
            cfg.meta, inner_steps_test=best.steps, inner_lr=best.lr, temperature=best.temperature
        )
        chosen = evaluate_features(
            feats, sampler, cfg.eval.episodes, "linear", loop=inner_loop(meta, test=True)
        )
        ncm = evaluate_features(feats, sampler, cfg.eval.episodes, "ncm")
        (a, a_ci), (n, n_ci) = confidence_interval(chosen), confidence_interval(ncm)
        report.append(
            f"| {shot} | {best.steps}, {best.lr:g}, {best.temperature:g} | {100 * best.accuracy[shot]:.2f} | "
            f"{100 * n:.2f} ± {100 * n_ci:.2f} | {100 * a:.2f} ± {100 * a_ci:.2f} | "
            f"{format_delta(*paired_difference(chosen, ncm))} |"
        )
    text = "\n".join(report)
    atomic_write_text(out / "tune.md", text + "\n")
    return text


def finetune_all(
    backbone: nn.Module,
    store: ImageStore,
    pre: Preprocess,
    runtime: Runtime,
    sampler: EpisodeSampler,
    episodes: int,
    temperature: float,
    steps: int = 20,
    lr: float = 0.01,
) -> np.ndarray:
    """`update-all`: per episode, fine-tune a copy of the whole network plus a new linear head on the
    support set (SGD, BN statistics fixed), then score the queries. The head scores L2-normalised
    features times `temperature`, as the meta base learner does. [episodes] accuracies."""
    accs = []
    bar = track(episodes, "update-all", "ep", leave=False)
    for i in range(episodes):
        e = sampler.episode(i)
        net = copy.deepcopy(backbone).eval()  # BN keeps its pre-trained statistics on 5-25 images
        head = nn.Linear(int(backbone.out_dim), sampler.way).to(runtime.device)  # type: ignore[arg-type]
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=lr, momentum=0.9)
        xs = runtime.images(to_float(torch.from_numpy(store.images[e.support]), pre.mean, pre.std))
        xq = runtime.images(to_float(torch.from_numpy(store.images[e.query]), pre.mean, pre.std))
        ys = episode_labels(sampler.way, sampler.shot, 1, runtime.device)[0]
        yq = episode_labels(sampler.way, sampler.query, 1, runtime.device)[0]
        for _ in range(steps):
            with runtime.autocast():
                loss = F.cross_entropy(head(F.normalize(net(xs).float(), dim=-1) * temperature), ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad(), runtime.autocast():
            pred = head(F.normalize(net.eval()(xq).float(), dim=-1) * temperature).argmax(-1)
        accs.append(float((pred == yq).float().mean()))
        bar.update(1)
    bar.close()
    return np.asarray(accs)


def method_config(cfg: Config, method: str, shot: int, extra: Mapping[str, Config] | None = None) -> Config:
    """The config a meta row trains with: `cfg` with the method (and HT for mtl-ht), or, for a row
    named in `extra`, that config's whole phase-2 section."""
    if extra and method in extra:
        return dataclasses.replace(cfg, meta=dataclasses.replace(extra[method].meta, shot=shot))
    m = cfg.meta
    ht = dataclasses.replace(m.ht, enabled=method == "mtl-ht")
    name = check_value("mtl" if method == "mtl-ht" else method, Method, "meta.method")
    return dataclasses.replace(cfg, meta=dataclasses.replace(m, method=name, shot=shot, ht=ht))


def ablate(
    cfg: Config,
    pretrained: Path,
    out: Path,
    methods: list[str],
    shots: list[int],
    episodes: int,
    *,
    update_all_episodes: int = 100,
    overwrite: bool = False,
    keep_going: bool = False,
    extra: Mapping[str, Config] | None = None,
) -> list[Row]:
    """Run the ablation; writes out/ablation.md, out/ablation.csv and out/ablation-episodes.csv (every
    row's per-episode accuracies) and returns the rows. `extra` adds meta-learned rows, one per name,
    each trained with that config's phase-2 section (e.g. the original code's settings).

    A row that fails stops the ablation with a TrainingError (the tables keep the rows so far), unless
    `keep_going`: then it is marked failed in the tables and the next row runs.
    """
    extra = dict(extra or {})
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown ablation method '{unknown[0]}'; choose from {', '.join(METHODS)}")
    clash = sorted(set(extra) & set(METHODS))
    if clash:
        raise UserError(f"extra row name '{clash[0]}' is a built-in method; name it differently")
    methods = [*methods, *extra]
    f = phase_one_features(cfg, pretrained)
    backbone, pre, runtime, source = f.backbone, f.pre, f.runtime, f.source
    store, feats = f.store, f.feats
    split = cfg.eval.split
    way = cfg.eval.ways[0]
    # NCM on the same episodes is every row's paired reference.
    ncm = {
        shot: evaluate_features(
            feats, EpisodeSampler(store, way, shot, cfg.eval.query, cfg.eval.seed), episodes, "ncm"
        )
        for shot in shots
    }
    rows: list[Row] = []
    for method in methods:
        for shot in shots:
            row = Row(method, shot)
            t0 = time.perf_counter()
            sampler = EpisodeSampler(store, way, shot, cfg.eval.query, cfg.eval.seed)
            try:
                if method in FEATURE_METHODS:
                    loop = None
                    if method == "logreg":
                        loop = logreg_loop(cfg)
                    elif method == "update-theta":
                        loop = choose_theta_loop(cfg, f.val_feats, f.val, shot)
                    elif method == "base-learner":
                        loop = inner_loop(cfg.meta, test=True)
                    kind = "ncm" if method == "ncm" else "linear"
                    accs = evaluate_features(feats, sampler, episodes, kind, loop=loop)
                    row.trainable = 0 if method == "ncm" else way * (feats.shape[1] + 1)
                elif method == "update-all":
                    accs = finetune_all(
                        backbone,
                        store,
                        pre,
                        runtime,
                        sampler,
                        min(episodes, update_all_episodes),
                        cfg.meta.temperature,
                    )
                    row.trainable = sum(p.numel() for p in backbone.parameters()) + way * (feats.shape[1] + 1)
                else:
                    mcfg = method_config(cfg, method, shot, extra)
                    run_dir = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', method).strip('-')}-{shot}shot"
                    if not reuse_finished(run_dir, mcfg, "meta", overwrite=overwrite):
                        meta_train(mcfg, source, run_dir, overwrite=overwrite)
                    setting = TestSetting(split, way, shot, cfg.eval.query, episodes, cfg.eval.seed)
                    (result,) = meta_test(run_dir, [setting], mcfg, progress=False)
                    learner, _, _ = load_meta_model(run_dir / MODEL_FILE)
                    row.trainable = _trainable(learner)
                    summary = read_json(run_dir / "summary.json")
                    row.tasks = int(summary["tasks"]) + int(summary["hard_tasks"])
                    row.seconds = float(summary["seconds"])
                    row.kept = kept_tasks(run_dir)
                    accs = result.accuracies
                row.accuracy, row.ci95 = confidence_interval(accs)
                row.episodes = len(accs)
                row.accuracies = np.asarray(accs)
                row.delta, row.delta_ci = paired_difference(accs, ncm[shot][: len(accs)])
            except (UserError, RuntimeError, ValueError) as exc:
                row.error = str(exc).splitlines()[0][:200]
            if method not in META_METHODS:
                row.seconds = time.perf_counter() - t0
            rows.append(row)
            print(_describe(row))
            # The top folder is ours too: marked (so its files are listed) and written only under its lock.
            with folder_lock(claim_folder(out, data_root=cfg.data.root), "ablate"):
                write_tables(out, rows, shots)
            if row.error and not keep_going:
                raise TrainingError(
                    f"ablation row {method} {shot}-shot failed: {row.error}; pass --keep-going to go on past failed rows"
                )
    return rows


def _trainable(learner: MetaLearner) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)


def _describe(row: Row) -> str:
    if row.error:
        return f"{row.method} {row.shot}-shot: failed: {row.error}"
    return (
        f"{row.method} {row.shot}-shot: {100 * row.accuracy:.2f} ± {100 * row.ci95:.2f}% ({row.episodes} episodes), "
        f"vs NCM {format_delta(row.delta, row.delta_ci)} (paired)"
    )


def write_tables(out: Path, rows: list[Row], shots: list[int]) -> None:
    """ablation.csv (one row per method and shot), ablation-episodes.csv (method, shot, episode,
    accuracy: every row's per-episode accuracies, for paired comparisons) and ablation.md (one row per
    method, with each shot's paired difference to NCM on the same episodes)."""
    fields = [f.name for f in dataclasses.fields(Row) if f.name != "accuracies"]
    csv_lines = [",".join(fields)] + [
        ",".join(str(getattr(r, f)).replace(",", ";") for f in fields) for r in rows
    ]
    atomic_write_text(out / "ablation.csv", "\n".join(csv_lines) + "\n")
    episode_lines = ["method,shot,episode,accuracy"] + [
        f"{r.method},{r.shot},{i},{a:.6f}" for r in rows for i, a in enumerate(r.accuracies)
    ]
    atomic_write_text(out / "ablation-episodes.csv", "\n".join(episode_lines) + "\n")
    head = (
        "| method | trainable parameters | meta-training tasks | training time (s) | "
        + " | ".join(f"{s}-shot accuracy (%) | {s}-shot Δ vs NCM (paired 95% CI)" for s in shots)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + 2 * len(shots))]
    for method in dict.fromkeys(r.method for r in rows):
        mine = {r.shot: r for r in rows if r.method == method}
        first = next(iter(mine.values()))
        cells = []
        for s in shots:
            r = mine.get(s)
            if r is None:
                cells += ["", ""]
            elif r.error:
                cells += [f"failed: {r.error}", ""]
            else:
                cells.append(
                    f"{100 * r.accuracy:.2f} ± {100 * r.ci95:.2f}"
                    + (f" ({r.episodes} ep.)" if r.episodes != rows[0].episodes else "")
                    + (f" [kept at task {r.kept}]" if r.kept >= 0 else "")
                )
                cells.append(format_delta(r.delta, r.delta_ci))
        seconds = sum(r.seconds for r in mine.values())
        lines.append(
            f"| {method} | {first.trainable:,} | {sum(r.tasks for r in mine.values())} | {seconds:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")

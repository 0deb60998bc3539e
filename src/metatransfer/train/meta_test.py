"""Phase 3, meta-test: Phi fixed, each episode adapts only the base learner on its support set.

`meta_test` scores a meta-trained run on each requested setting (split, way, shot, episodes, seed)
with the batched episode evaluation of `evaluate`, and records results.json plus per-episode CSVs.

A finished run gets its results written into its folder, under the folder's lock. An unfinished run (one
being trained by another process, or stopped before it finished) is evaluated read-only: its model is
the best so far, not the kept one, the result line says "unfinished run: model at task N of M", and the
results are written only to `out` when one is given.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metatransfer import distributed as dist
from metatransfer.config import Config, load_config
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import open_split
from metatransfer.device import resolve_runtime
from metatransfer.errors import UserError
from metatransfer.models.meta_learner import inner_loop
from metatransfer.models.model_files import MODEL_FILE, load_meta_model
from metatransfer.progress import note
from metatransfer.report import safetensors_metadata
from metatransfer.runs import (
    CONFIG_FILE,
    DONE_FILE,
    atomic_write_text,
    claim_folder,
    folder_lock,
    lock_holder,
    read_json,
    write_json,
)
from metatransfer.train.evaluate import (
    confidence_interval,
    evaluate_features,
    extract_features,
    format_accuracy,
)

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class TestSetting:
    split: str = "test"
    way: int = 5
    shot: int = 1
    query: int = 15
    episodes: int = 600
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.split}/{self.way}-way/{self.shot}-shot/{self.episodes}-episodes/seed-{self.seed}"


@dataclass(frozen=True)
class TestResult:
    setting: TestSetting
    accuracy: float
    ci95: float
    seconds: float
    accuracies: np.ndarray  # [episodes] per-episode query accuracy, in episode order
    selection_seed: int  # the seed of the val episodes that chose the model (its epoch and checkpoint)
    unfinished: str | None = None  # for a run not finished: "model at task N of M"

    @property
    def line(self) -> str:
        s = self.setting
        accuracy = format_accuracy(self.accuracy, self.ci95, s.episodes, s.way, s.shot, s.split)
        if self.unfinished:
            return (
                f"{accuracy}; episodes of seed {s.seed}; unfinished run: {self.unfinished}, not the kept one"
            )
        return (
            accuracy
            + f"; episodes of seed {s.seed}, model chosen on val episodes of seed {self.selection_seed}"
        )


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    if not (run_dir / CONFIG_FILE).exists():
        raise UserError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the folder mtl meta-train wrote"
        )
    return load_config(run_dir / CONFIG_FILE, overrides)


def unfinished_status(run_dir: Path, cfg: Config) -> str | None:
    """None for a finished run nobody is training; else "model at task N of M" (plus who trains it).

    N is what the model file records (the best so far), M the run's meta.tasks.
    """
    holder = lock_holder(run_dir)
    training = holder is not None and holder.training
    if (run_dir / DONE_FILE).exists() and not training:
        return None
    tasks = safetensors_metadata(run_dir / MODEL_FILE).get("tasks", "?")
    who = f"; being trained by {holder.describe()}" if training and holder else ""
    return f"model at task {tasks} of {cfg.meta.tasks}{who}"


def meta_test(
    run_dir: Path,
    settings: list[TestSetting],
    cfg: Config,
    *,
    progress: bool = True,
    out: Path | None = None,
) -> list[TestResult]:
    """Evaluate the meta-trained model in `run_dir` on each setting; writes results.json and per-episode CSVs
    into `out` if given, else into a finished `run_dir` (under its lock), else nowhere (see the module).

    Features of each split are computed once; the episodes of all settings reuse them.
    """
    model_path = run_dir / MODEL_FILE
    if not model_path.exists():
        raise UserError(f"{run_dir} holds no {MODEL_FILE}; has mtl meta-train finished a validation there?")
    if out is not None and dist.context().is_main:
        out = claim_folder(out, data_root=cfg.data.root)
    unfinished = unfinished_status(run_dir, cfg)
    if unfinished and out is None and progress and dist.context().is_main:
        note(f"unfinished run {run_dir}: {unfinished}; results are saved only with --out")
    learner, pre, meta = load_meta_model(model_path)
    runtime = resolve_runtime(cfg)
    runtime.model(learner)
    ctx = dist.context()
    loop = inner_loop(meta, test=True)
    results: list[TestResult] = []
    features: dict[str, tuple[Any, torch.Tensor]] = {}
    for s in settings:
        t0 = time.perf_counter()
        if s.split not in features:
            store = open_split(
                dataclasses.replace(cfg.data, size=pre.size), s.split, progress=progress and ctx.is_main
            )
            feats = extract_features(
                learner.backbone, store, runtime, pre.mean, pre.std, progress=progress and ctx.is_main
            )
            features[s.split] = (store, feats)
        store, feats = features[s.split]
        sampler = EpisodeSampler(store, s.way, s.shot, s.query, s.seed)
        init = learner.frozen_init(s.way)
        ids = dist.rank_share(np.arange(s.episodes))  # episodes split across ranks under torchrun
        mine = evaluate_features(
            feats,
            sampler,
            s.episodes,
            "linear",
            loop=loop,
            init=init,
            ids=ids,
            progress=progress and ctx.is_main,
        )
        accs = dist.gather_rows(mine)
        mean, ci = confidence_interval(accs)
        result = TestResult(s, mean, ci, time.perf_counter() - t0, accs, cfg.eval.selection_seed, unfinished)
        if s.split == "val" and s.seed == cfg.eval.selection_seed and ctx.is_main:
            warnings.warn(
                f"val episodes of seed {s.seed} chose this model (eval.selection_seed); "
                "its accuracy on them is optimistic: report another --seed",
                stacklevel=2,
            )
        results.append(result)
        if ctx.is_main and (out is not None or not unfinished):
            _save_result(out or run_dir, result, accs)
    return results


def _save_result(folder: Path, result: TestResult, accs: np.ndarray) -> None:
    """Add `result` to `folder`'s results.json and write its per-episode CSV, holding the folder's lock:
    results.json is read, updated and written, so two meta-tests at once must take turns."""
    with folder_lock(folder, "meta-test"):
        if folder.joinpath(MODEL_FILE).exists() and not (folder / DONE_FILE).exists():
            # The run was started again (--overwrite) while we evaluated its previous model.
            raise UserError(f"{folder} is being trained again; results not saved there (use --out)")
        _write_result(folder, result, accs)


def _write_result(folder: Path, result: TestResult, accs: np.ndarray) -> None:
    s = result.setting
    path = folder / RESULTS_FILE
    results = read_json(path) if path.exists() else {}
    results[s.key] = {
        **dataclasses.asdict(s),
        "accuracy": result.accuracy,
        "ci95": result.ci95,
        "seconds": result.seconds,
        "selection_seed": result.selection_seed,
    }
    write_json(path, results)
    csv_name = f"episodes-{s.split}-{s.way}way-{s.shot}shot.csv"
    atomic_write_text(
        folder / csv_name, "episode,accuracy\n" + "".join(f"{i},{a:.6f}\n" for i, a in enumerate(accs))
    )

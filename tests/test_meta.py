"""Meta-training internals: what the outer loop updates, hard tasks, compare-ht and ablate end to end."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer.cli import main
from metatransfer.config import load_config
from metatransfer.data.preprocess import Preprocess
from metatransfer.data.sampler import EpisodeSampler
from metatransfer.data.store import ImageStore
from metatransfer.device import resolve_runtime
from metatransfer.models.backbones import create_backbone
from metatransfer.models.meta_learner import MetaLearner, prepare_backbone
from metatransfer.models.scale_shift import SSConv2d
from metatransfer.predict import export_model
from metatransfer.runs import load_state, load_weights, read_json, save_state
from metatransfer.train.baselines import finetune_all
from metatransfer.train.evaluate import format_delta, paired_difference
from metatransfer.train.meta import MetaTrainer, TaskBatch, precise_bn, recalibrate_run

from tiny import write_config, write_pattern_folder


def _store(classes: int = 6, per_class: int = 10, size: int = 28) -> ImageStore:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (classes * per_class, size, size, 1), dtype=np.uint8)
    offsets = np.arange(classes + 1, dtype=np.int64) * per_class
    return ImageStore.from_offsets(images, offsets, [f"c{i}" for i in range(classes)], "train")


def _trainer(
    first_order: bool = True, method: str = "mtl", compile: bool = False, **meta: object
) -> MetaTrainer:
    overrides = [
        f"meta.{k}={v}" for k, v in {"way": 3, "shot": 1, "query": 3, "meta_batch": 2, **meta}.items()
    ]
    cfg = load_config(
        None,
        [
            *overrides,
            f"meta.first_order={str(first_order).lower()}",
            f"meta.method={method}",
            "precision=fp32",
            f"compile={str(compile).lower()}",
        ],
    )
    torch.manual_seed(0)
    backbone = create_backbone("conv4", 1, hidden=4)
    prepare_backbone(backbone, cfg.meta)
    learner = MetaLearner(backbone, cfg.meta.way)
    pre = Preprocess(28, 1, (0.5,), (0.25,))
    return MetaTrainer(cfg, learner, _store(), pre, resolve_runtime(cfg))


@pytest.mark.parametrize("first_order", [True, False])
def test_outer_update_moves_phi_and_theta_never_w(first_order: bool) -> None:
    trainer = _trainer(first_order)
    convs = [m for m in trainer.learner.modules() if isinstance(m, SSConv2d)]
    weights = [c.weight.clone() for c in convs]
    scales = [c.scale.detach().clone() for c in convs]
    theta = trainer.learner.theta_weight.detach().clone()
    batch = TaskBatch.of([trainer.sampler.episode(i) for i in range(2)])
    loss, acc, cls_loss = trainer.learn(batch, step_seed=0, total=2)
    assert np.isfinite(loss) and acc.shape == cls_loss.shape == (2, 3)
    assert all(torch.equal(w, c.weight) for w, c in zip(weights, convs, strict=True))
    assert all(c.weight.grad is None for c in convs)
    assert any(not torch.equal(s, c.scale) for s, c in zip(scales, convs, strict=True))
    assert not torch.equal(theta, trainer.learner.theta_weight)


def test_first_order_proto_start_keeps_the_support_branch() -> None:
    # With no inner steps there are no second-order terms to drop: first order and exact must make the
    # same update, the support features reaching Phi through the prototypes in both.
    updated = []
    for first_order in (True, False):
        trainer = _trainer(first_order, classifier_init="proto", inner_steps=0)
        trainer.learn(TaskBatch.of([trainer.sampler.episode(i) for i in range(2)]), step_seed=0, total=2)
        updated.append([p.detach().clone() for p in trainer.learner.parameters()])
    for p, q in zip(*updated, strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def _two_updates(trainer: MetaTrainer) -> tuple[list[float], list[torch.Tensor]]:
    losses = [
        trainer.learn(TaskBatch.of([trainer.sampler.episode(2 * s + i) for i in range(2)]), s, 2)[0]
        for s in range(2)
    ]
    return losses, [p.detach().clone() for p in trainer.learner.parameters()]


def test_compiled_meta_training_matches_eager() -> None:
    eager_losses, eager_params = _two_updates(_trainer())
    compiled = _trainer(compile=True)
    losses, params = _two_updates(compiled)
    assert compiled._query_forward is not compiled.learner.backbone
    assert compiled._query_forward._fn is not None  # type: ignore[attr-defined]  # really compiled, no fallback
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    for p, q in zip(params, eager_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(module: torch.nn.Module) -> object:
        def fail(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    eager_losses, eager_params = _two_updates(_trainer())
    with pytest.warns(
        RuntimeWarning, match="torch.compile failed .RuntimeError: no C.. compiler found."
    ) as record:
        losses, params = _two_updates(_trainer(compile=True))
    assert len(record) == 1  # warned once, then eager without retrying
    assert losses == eager_losses
    assert all(torch.equal(p, q) for p, q in zip(params, eager_params, strict=True))


def test_ft_theta_updates_only_theta() -> None:
    trainer = _trainer(method="ft-theta")
    before = {k: v.clone() for k, v in trainer.learner.backbone.state_dict().items()}
    trainer.learn(TaskBatch.of([trainer.sampler.episode(i) for i in range(2)]), step_seed=0, total=2)
    after = trainer.learner.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hard_tasks_use_failure_classes_and_fresh_images() -> None:
    trainer = _trainer()
    # Classes of 30 images: a class in both tasks still has shot + query images neither task used.
    trainer.sampler = EpisodeSampler(_store(per_class=30), 3, 1, 3, trainer.cfg.seed)
    batch = TaskBatch.of([trainer.sampler.episode(i) for i in range(2)])
    # Fabricated accuracies: task 0 fails class position 2, task 1 fails position 0.
    acc = np.array([[1.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
    loss = np.zeros_like(acc)
    hard = trainer.hard_batch(batch, acc, loss, hard_done=0)
    failures = {int(batch.classes[0, 2]), int(batch.classes[1, 0])}
    allowed = failures | {int(batch.classes[1, 1])}  # the next hardest fills the third slot
    assert len(hard) == trainer.m.ht.tasks_per_batch
    assert set(hard.classes[0].tolist()) == allowed
    failed_queries = set(batch.query.ravel().tolist())
    hard_images = set(hard.support.ravel().tolist()) | set(hard.query.ravel().tolist())
    assert not failed_queries & hard_images
    assert dict(trainer.failures) == {c: 1 for c in failures}


def test_hard_tasks_shuffle_labels_and_avoid_the_learned_support_images() -> None:
    trainer = _trainer(**{"ht.tasks_per_batch": 8})
    trainer.sampler = EpisodeSampler(_store(per_class=30), 3, 1, 3, trainer.cfg.seed)  # fresh images to spare
    batch = TaskBatch.of([trainer.sampler.episode(i) for i in range(2)])
    acc = np.array([[1.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
    hard = trainer.hard_batch(batch, acc, np.zeros_like(acc), hard_done=0)
    hardest = int(batch.classes[1, 0])
    # Every hard task holds the same classes, labelled in a random order: label 0 is not always the hardest.
    assert all(set(c.tolist()) == set(hard.classes[0].tolist()) for c in hard.classes)
    assert len({tuple(c.tolist()) for c in hard.classes}) > 1
    assert hardest in hard.classes[:, 1:]
    learned = set(batch.support.ravel().tolist()) | set(batch.query.ravel().tolist())
    assert not learned & (set(hard.support.ravel().tolist()) | set(hard.query.ravel().tolist()))
    again = trainer.hard_batch(batch, acc, np.zeros_like(acc), hard_done=0)
    assert all(np.array_equal(getattr(hard, f), getattr(again, f)) for f in ("classes", "support", "query"))


def test_hard_tasks_leave_the_ordinary_stream_unchanged() -> None:
    trainer = _trainer()
    before = [trainer.sampler.episode(i).query.tolist() for i in range(4)]
    batch = TaskBatch.of([trainer.sampler.episode(i) for i in range(2)])
    trainer.hard_batch(batch, np.zeros((2, 3)), np.zeros((2, 3)), hard_done=0)
    assert [trainer.sampler.episode(i).query.tolist() for i in range(4)] == before


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("meta")
    data = write_pattern_folder(tmp / "data")
    config = write_config(
        tmp / "cfg.yaml", data, tmp / "cache", pretrain={"epochs": 2}, meta={"ht": {"tasks_per_batch": 2}}
    )
    assert main(["pretrain", "--config", str(config), "--out", str(tmp / "pre")]) == 0
    return config, tmp


def test_meta_train_says_which_model_it_kept(
    pretrained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary, the saved model and the last line agree on the kept checkpoint (val scripted to peak
    at task 4 of 8); with Phi and theta frozen val cannot beat the start, and the run says it kept the start."""
    config, tmp = pretrained
    args = ["meta-train", "--config", str(config), "--pretrained", str(tmp / "pre")]
    scripted = iter([(0.50, 0.1), (0.70, 0.1), (0.60, 0.1)])  # validations at tasks 0, 4 and 8
    with monkeypatch.context() as m:
        m.setattr(MetaTrainer, "validate", lambda *_: next(scripted))
        capsys.readouterr()
        assert main([*args, "--out", str(tmp / "kept-peak")]) == 0
    printed = capsys.readouterr().out
    assert read_json(tmp / "kept-peak" / "summary.json")["kept_tasks"] == 4
    assert load_weights(tmp / "kept-peak" / "model.safetensors")[1]["tasks"] == "4"
    assert "kept the model at task 4 (val 70.00% on selection episodes of seed 1)\n" in printed

    frozen = ["--set", "meta.lr_ss=0", "--set", "meta.lr_theta=0", "--out", str(tmp / "kept-start")]
    assert main([*args, *frozen]) == 0
    printed = capsys.readouterr().out
    assert read_json(tmp / "kept-start" / "summary.json")["kept_tasks"] == 0
    assert load_weights(tmp / "kept-start" / "model.safetensors")[1]["tasks"] == "0"
    assert "kept the model at task 0" in printed and "meta-training never beat the start on val" in printed


def test_compare_ht_writes_curve_plot_and_table(pretrained: tuple[Path, Path]) -> None:
    config, tmp = pretrained
    out = tmp / "compare"
    assert (
        main(["compare-ht", "--config", str(config), "--pretrained", str(tmp / "pre"), "--out", str(out)])
        == 0
    )
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    final = {v: max(int(r["tasks"]) for r in rows if r["variant"] == v) for v in ("ht", "no-ht")}
    assert final["ht"] == final["no-ht"]  # compared at an equal number of tasks
    assert (out / "ht" / "failure_classes.csv").exists()
    table = (out / "comparison.md").read_text()
    assert "| ht |" in table and "| no-ht |" in table
    # The paired row is the per-episode difference of the two arms' episode files.
    arms = [_episode_accuracies(out / v / "episodes-test-3way-1shot.csv") for v in ("ht", "no-ht")]
    assert f"| HT − no HT (paired 95% CI) | | {format_delta(*paired_difference(*arms))} |" in table


def _episode_accuracies(path: Path) -> np.ndarray:
    with path.open() as f:
        return np.array([float(r["accuracy"]) for r in csv.DictReader(f)])


def test_compare_prints_the_paired_difference_of_two_runs(
    pretrained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, tmp = pretrained
    out = tmp / "compare"
    if not (out / "ht").exists():  # the compare-ht test above trains both arms
        assert (
            main(["compare-ht", "--config", str(config), "--pretrained", str(tmp / "pre"), "--out", str(out)])
            == 0
        )
    capsys.readouterr()
    args = ["compare", str(out / "ht"), str(out / "no-ht"), "--split", "test", "--way", "3", "--query", "4"]
    assert main([*args, "--episodes", "20"]) == 0
    printed = capsys.readouterr().out.splitlines()
    arms = [_episode_accuracies(out / v / "episodes-test-3way-1shot.csv")[:20] for v in ("ht", "no-ht")]
    assert len(arms[0]) == 20
    assert printed[-1] == (
        f"A - B: {format_delta(*paired_difference(*arms))} points (paired 95% CI over the same 20 episodes)"
    )
    assert "episodes of seed 0, model chosen on val episodes of seed 1" in printed[0]


def test_compare_sets_every_run_against_the_last_and_overlays_their_curves(
    pretrained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep in one command: each run's paired difference from the last one; a run against itself is
    exactly 0 ± 0, and --curves draws every run's val curve."""
    config, tmp = pretrained
    out = tmp / "compare"
    if not (out / "ht").exists():
        assert (
            main(["compare-ht", "--config", str(config), "--pretrained", str(tmp / "pre"), "--out", str(out)])
            == 0
        )
    ht, no_ht = str(out / "ht"), str(out / "no-ht")
    png = tmp / "sweep.png"
    capsys.readouterr()
    setting = ["--split", "test", "--way", "3", "--query", "4", "--episodes", "20", "--curves", str(png)]
    assert main(["compare", ht, no_ht, ht, *setting]) == 0
    printed = capsys.readouterr().out.splitlines()
    arms = [_episode_accuracies(out / v / "episodes-test-3way-1shot.csv")[:20] for v in ("ht", "no-ht")]
    assert [line[:2] for line in printed[:3]] == ["A ", "B ", "C "]
    assert printed[3] == "A - C: +0.00 ± 0.00 points (paired 95% CI over the same 20 episodes)"
    b_minus_c = format_delta(*paired_difference(arms[1], arms[0]))
    assert printed[4] == f"B - C: {b_minus_c} points (paired 95% CI over the same 20 episodes)"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", ht, *setting]) == 2
    assert "at least two runs" in capsys.readouterr().err


def _record_test_episodes(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, int], list[str]]:
    """{(ablation row's method, shot): a digest of each test episode it evaluated, in order}. Every
    method draws its episodes from an EpisodeSampler, so this sees them whatever evaluates them (feature
    methods, fine-tuning, meta-test of a trained run); train and val episodes are left out."""
    from metatransfer.train import baselines

    seen: dict[tuple[str, int], list[str]] = {}
    row: list[tuple[str, int]] = [("ncm (the paired reference)", 0)]
    real_row, real_episode = baselines.Row, EpisodeSampler.episode

    class TrackedRow(real_row):  # type: ignore[valid-type,misc]
        def __init__(self, method: str, shot: int) -> None:
            row[0] = (method, shot)
            super().__init__(method, shot)

    def episode(self: EpisodeSampler, i: int) -> object:
        e = real_episode(self, i)
        names = self.class_names or []
        if names and all(n.startswith("test-") for n in names):
            h = hashlib.sha256(f"{i};{self.way};{self.shot};{self.query};".encode())
            h.update(",".join(names[c] for c in e.classes).encode())
            for a in (e.support, e.query):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            seen.setdefault(row[0], []).append(h.hexdigest())
        return e

    monkeypatch.setattr(baselines, "Row", TrackedRow)
    monkeypatch.setattr(EpisodeSampler, "episode", episode)
    return seen


def test_ablate_runs_every_method_on_identical_episodes(
    pretrained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, tmp = pretrained
    evaluated = _record_test_episodes(monkeypatch)
    out = tmp / "ablation"
    args = ["ablate", "--config", str(config), "--pretrained", str(tmp / "pre"), "--out", str(out)]
    original = write_config(
        tmp / "original.yaml",
        tmp / "data",
        tmp / "cache",
        meta={
            "ss_granularity": "kernel",
            "bn": "batch",
            "normalize_features": False,
            "temperature": 1.0,
            "inner_lr": 0.01,
            "meta_batch": 1,
        },
    )
    extra = ["--extra", f"mtl (original code)={original}"]
    assert main([*args, "--shots", "1", "--episodes", "12", "--set", "meta.tasks=4", *extra]) == 0
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    methods = [r["method"] for r in rows]
    assert methods == [
        "update-theta",
        "update-all",
        "base-learner",
        "ft-theta",
        "ft-last",
        "ss-last",
        "mtl",
        "mtl-ht",
        "ncm",
        "logreg",
        "mtl (original code)",
    ]
    assert all(not r["error"] for r in rows), rows
    table = (out / "ablation.md").read_text()
    # Every row's per-episode accuracies are written; its Δ vs NCM is their paired difference.
    per_episode: dict[str, list[float]] = {}
    with (out / "ablation-episodes.csv").open() as f:
        for r in csv.DictReader(f):
            per_episode.setdefault(r["method"], []).append(float(r["accuracy"]))
    ncm = np.array(per_episode["ncm"])
    for r in rows:
        accs = np.array(per_episode[r["method"]])
        assert float(r["accuracy"]) == pytest.approx(accs.mean(), abs=1e-6)
        delta = format_delta(*paired_difference(accs, ncm[: len(accs)]))
        assert f"{100 * float(r['accuracy']):.2f} ± {100 * float(r['ci95']):.2f}" in table
        assert delta in table.splitlines()[2 + methods.index(r["method"])]
    assert "| ncm |" in table and "+0.00 ± 0.00" in table
    # The extra row trained with the other config's phase-2 section.
    saved = load_config(out / "mtl-original-code-1shot" / "config.yaml")
    assert (saved.meta.ss_granularity, saved.meta.bn, saved.meta.meta_batch) == ("kernel", "batch", 1)
    # The same episodes for every method: the very classes and images of each, not just as many.
    assert set(evaluated) == {("ncm (the paired reference)", 0), *((m, 1) for m in methods)}
    reference = evaluated[("ncm (the paired reference)", 0)]
    assert len(reference) == 12 and len(set(reference)) == 12
    for key, digests in evaluated.items():
        assert digests == reference, key


def test_ablate_writes_its_tables_only_under_the_folders_lock(
    pretrained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from metatransfer import runs

    config, tmp = pretrained
    out = tmp / "ablation-locked"
    args = ["ablate", "--config", str(config), "--pretrained", str(tmp / "pre"), "--out", str(out)]
    args += ["--methods", "ncm", "--shots", "1", "--episodes", "4"]
    out.mkdir()
    trainer = runs._acquire_lock(out, f"{runs.TRAINING} (meta)")  # as a process training that folder holds it
    try:
        assert main(args) == 2
    finally:
        trainer.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being trained by" in err[0], err
    assert not any(p.name.startswith("ablation") for p in out.iterdir())
    assert main(args) == 0  # the lock free: written, and listed in the folder's marker
    marker = runs._marker(out)
    assert marker is not None
    assert {"ablation.csv", "ablation.md", "ablation-episodes.csv"} <= set(marker["files"])


def test_ablate_stops_at_a_failed_row_unless_keep_going(
    pretrained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from metatransfer.errors import TrainingError
    from metatransfer.train import baselines

    def diverge(*args: object, **kwargs: object) -> None:
        raise TrainingError("loss became nan at task 2")

    monkeypatch.setattr(baselines, "meta_train", diverge)
    config, tmp = pretrained
    args = [
        "ablate",
        "--config",
        str(config),
        "--pretrained",
        str(tmp / "pre"),
        "--shots",
        "1",
        "--episodes",
        "4",
    ]
    methods = ["--methods", "ncm,mtl,logreg"]
    assert main([*args, *methods, "--out", str(tmp / "stop")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("mtl: error: ablation row mtl 1-shot failed: loss became nan")
        and "--keep-going" in err
    )
    with (tmp / "stop" / "ablation.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["ncm", "mtl"]  # stopped at the failed row
    assert main([*args, *methods, "--out", str(tmp / "go"), "--keep-going"]) == 0
    with (tmp / "go" / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (
        [r["method"] for r in rows] == ["ncm", "mtl", "logreg"] and rows[1]["error"] and not rows[2]["error"]
    )


def test_update_all_scores_with_the_configured_temperature() -> None:
    cfg = load_config(None, ["precision=fp32"])
    torch.manual_seed(0)
    backbone = create_backbone("conv4", 1, hidden=4)
    store, pre = _store(), Preprocess(28, 1, (0.5,), (0.25,))
    sampler = EpisodeSampler(store, 3, 1, 3, seed=0)
    args = (backbone, store, pre, resolve_runtime(cfg), sampler, 3)
    # Temperature 0 zeroes the features: the head's gradient vanishes on a balanced support set, so
    # every query gets class 0 and each episode scores exactly 1/way.
    assert np.allclose(finetune_all(*args, temperature=0.0, steps=2), 1 / 3)
    assert not np.allclose(finetune_all(*args, temperature=10.0, steps=2), 1 / 3)


def test_tune_base_learner_chooses_on_selection_episodes_and_reports_vs_ncm(
    pretrained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, tmp = pretrained
    out = tmp / "tune"
    args = ["tune-base-learner", "--config", str(config), "--pretrained", str(tmp / "pre"), "--out", str(out)]
    grid = ["--steps", "0,5", "--lrs", "0.1,0.5", "--temperatures", "10", "--episodes", "15", "--shots", "1"]
    assert main([*args, *grid, "--set", "meta.classifier_init=proto", "--set", "eval.split=val"]) == 0
    with (out / "tune.csv").open() as f:
        points = list(csv.DictReader(f))
    assert [(p["steps"], p["lr"]) for p in points] == [("0", "0.1"), ("0", "0.5"), ("5", "0.1"), ("5", "0.5")]
    # proto init with 0 steps is NCM whatever the lr: the two rows agree exactly.
    assert points[0]["val_1shot"] == points[1]["val_1shot"]
    best = max(points, key=lambda p: (round(float(p["val_1shot"]), 6), -int(p["steps"])))
    report = (out / "tune.md").read_text()
    assert (
        f"| 1 | {best['steps']}, {float(best['lr']):g}, 10 | {100 * float(best['val_1shot']):.2f} |" in report
    )
    assert "of seed 1" in report and "of seed 0" in report
    assert report in capsys.readouterr().out


def test_pooled_hard_tasks_follow_every_kth_meta_batch_and_resume_exactly(tmp_path: Path) -> None:
    """The paper's variant: failure classes of 2 meta-batches pooled, then 2 hard tasks drawn from the pool;
    a resume from between the two meta-batches (pool half full) continues exactly."""
    ht = {"ht.enabled": "true", "ht.pool_batches": 2, "ht.tasks_per_batch": 1}
    trainer = _trainer(**ht)
    trainer.next_meta_batch()
    assert (trainer.tasks_done, trainer.hard_done, len(trainer.pool)) == (2, 0, 1)
    save_state(tmp_path / "state.pt", trainer.state_dict())
    trainer.next_meta_batch()
    assert (trainer.tasks_done, trainer.hard_done, len(trainer.pool)) == (4, 2, 0)
    pooled = {int(c) for c in trainer.failures}
    assert sum(trainer.failures.values()) == 4  # one failure class per ordinary task of both batches
    assert pooled <= set(range(6))
    resumed = _trainer(**ht)
    resumed.load_state_dict(load_state(tmp_path / "state.pt"))
    assert len(resumed.pool) == 1
    resumed.next_meta_batch()
    assert resumed.hard_done == 2 and resumed.failures == trainer.failures
    for p, q in zip(trainer.learner.parameters(), resumed.learner.parameters(), strict=True):
        assert torch.equal(p, q)


def test_pooled_hard_tasks_draw_their_classes_from_the_pool() -> None:
    trainer = _trainer(**{"ht.enabled": "true", "ht.pool_batches": 2, "ht.tasks_per_batch": 3})
    batch = TaskBatch.of([trainer.sampler.episode(i) for i in range(4)])  # two meta-batches of 2
    acc = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.5, 1.0, 1.0]])
    failures = {int(batch.classes[t, int(np.argmin(acc[t]))]) for t in range(4)}
    assert len(failures) >= 3, "the fixture's episodes must fail on at least `way` distinct classes"
    hard = trainer.hard_batch(batch, acc, np.zeros_like(acc), hard_done=0)
    assert len(hard) == 6  # tasks_per_batch per pooled meta-batch
    assert all(set(c.tolist()) <= failures for c in hard.classes)
    again = trainer.hard_batch(batch, acc, np.zeros_like(acc), hard_done=0)
    assert np.array_equal(hard.classes, again.classes)  # a pure function of (seed, hard task index)


def test_precise_bn_sets_the_plain_average_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Dropout(0.5)).eval()
    batches = [torch.randn(4, 2, 5, 5) * (k + 1) + k for k in range(3)]  # each with its own statistics
    assert precise_bn(net, batches) == 3
    with torch.no_grad():
        outputs = [net[0](x) for x in batches]
    bn = net[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    # Each batch weighs alike, not the last ones most as momentum 0.1 would have it.
    torch.testing.assert_close(bn.running_mean, torch.stack([y.mean((0, 2, 3)) for y in outputs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([y.var((0, 2, 3)) for y in outputs]).mean(0))
    assert bn.momentum == 0.1 and not net.training and not bn.training  # everything else as it was


def test_bn_recalibration_is_saved_exported_and_pairs_with_the_run_it_copies(
    pretrained: tuple[Path, Path],
) -> None:
    config, tmp = pretrained
    args = ["meta-train", "--config", str(config), "--pretrained", str(tmp / "pre")]
    args += ["--set", "meta.bn=batch", "--set", "meta.ss_granularity=kernel"]
    assert main([*args, "--out", str(tmp / "bn-plain")]) == 0
    assert main([*args, "--set", "meta.bn_recalibrate=3", "--out", str(tmp / "bn-precise")]) == 0
    recalibrate_run(tmp / "bn-plain", tmp / "bn-copy", 3)
    plain, precise, copy = (
        load_weights(tmp / d / "model.safetensors") for d in ("bn-plain", "bn-precise", "bn-copy")
    )
    stats = [k for k in plain[0] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k, tensor in plain[0].items():
        # One code path: the copy of a finished run is what meta-training with the key saves.
        assert torch.equal(precise[0][k], copy[0][k]), k
        if k in stats:
            assert not torch.equal(tensor, precise[0][k]), k
        elif k.endswith("num_batches_tracked"):
            assert int(precise[0][k]) == 3
        else:  # meta-training itself is unchanged
            assert torch.equal(tensor, precise[0][k]), k
    assert json.loads(precise[1]["meta"])["bn_recalibrate"] == 3
    assert json.loads(copy[1]["meta"])["bn_recalibrate"] == 3 and copy[1]["tasks"] == plain[1]["tasks"]
    exported = tmp / "bn-precise.mtl"
    export_model(tmp / "bn-precise" / "model.safetensors", exported)
    shipped = load_weights(exported)[0]
    assert all(torch.equal(shipped[k], precise[0][k]) for k in stats)
    episodes = ["--way", "3", "--query", "3", "--episodes", "10"]
    assert main(["compare", str(tmp / "bn-copy"), str(tmp / "bn-plain"), *episodes]) == 0
    assert main(["meta-test", str(tmp / "bn-copy"), *episodes]) == 0

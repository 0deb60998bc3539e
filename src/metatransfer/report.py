"""Training curves and a run report, built only from what a run wrote (`mtl report RUN_DIR`).

A run directory is one phase (it holds `metrics.csv`: `pretrain/`, `meta-1shot/`, ...) or a folder
of phases (what `mtl run` writes). From `metrics.csv`, `config.yaml`, `summary.json`,
`results.json` and the saved weights' metadata this module draws `curves.png`:

- pre-training: training loss, training accuracy and few-shot val accuracy (95% CI band) per epoch;
- meta-training: training query loss, and val accuracy (95% CI band) against ordinary tasks, with
  the spans in which hard tasks were learned shaded;

the kept checkpoint is starred in both. `build_report` gathers config highlights, best val, kept
checkpoint, test results with CIs, time and throughput; `render_markdown` makes `report.md` of it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metatransfer.errors import UserError
from metatransfer.runs import atomic_write_bytes, atomic_write_text, folder_lock, lock_holder

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
REPORT_FILE = "report.md"
PRETRAIN_WEIGHTS = "backbone.safetensors"
META_WEIGHTS = "model.safetensors"

Row = dict[str, float | None]


@dataclass(frozen=True)
class Phase:
    """One phase directory's metrics: `kind` is "pretrain" (rows per epoch) or "meta" (rows per validation)."""

    path: Path
    kind: str
    rows: list[Row]


def read_metrics(path: Path) -> list[Row]:
    """metrics.csv as rows of floats (None where a row has no value for a column)."""
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_phase(path: Path) -> Phase | None:
    """The phase in `path`, or None when it holds no metrics.csv of a known kind."""
    file = path / METRICS_FILE
    if not file.is_file():
        return None
    rows = read_metrics(file)
    columns = {k for row in rows for k in row}
    if "epoch" in columns:
        return Phase(path, "pretrain", rows)
    if "tasks" in columns:
        return Phase(path, "meta", rows)
    return None


def find_phases(run_dir: Path) -> list[Phase]:
    """The phase itself, or the phases one level below (pretrain first, then by name)."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    own = load_phase(run_dir)
    if own is not None:
        return [own]
    children = sorted(
        (d for d in run_dir.iterdir() if d.is_dir()), key=lambda d: (d.name != "pretrain", _natural(d.name))
    )
    phases = [p for p in map(load_phase, children) if p is not None]
    if not phases:
        raise UserError(
            f"{run_dir} holds no {METRICS_FILE}, nor do its sub-folders; pass a run directory written by mtl"
        )
    return phases


def _natural(name: str) -> tuple[str, int, str]:
    """Sort key putting meta-5shot before meta-20shot."""
    digits = "".join(c for c in name if c.isdigit())
    return ("".join(c for c in name if not c.isdigit()), int(digits) if digits else 0, name)


def _col(rows: Sequence[Row], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [float(a) for a, _ in pts], [float(b) for _, b in pts]  # type: ignore[arg-type]


def val_shots(rows: Sequence[Row]) -> list[int]:
    """The shots a pre-training run validated (columns val_1shot, val_5shot, ...)."""
    names = {k for r in rows for k in r if k.startswith("val_") and k.endswith("shot")}
    return sorted(int(k[4:-4]) for k in names if k[4:-4].isdigit())


def kept_pretrain_row(rows: Sequence[Row]) -> Row | None:
    """The epoch pre-training kept: the first with the best mean val accuracy over its shots."""
    shots = val_shots(rows)
    best: tuple[float, Row] | None = None
    for r in rows:
        vals = [r.get(f"val_{s}shot") for s in shots]
        if not vals or any(v is None for v in vals):
            continue
        score = sum(vals) / len(vals)  # type: ignore[arg-type]
        if best is None or score > best[0]:
            best = (score, r)
    return best[1] if best else None


def kept_meta_row(rows: Sequence[Row]) -> Row | None:
    """The validation meta-training kept: the first with the best val accuracy (the start competes)."""
    best: Row | None = None
    for r in rows:
        if r.get("val_acc") is not None and (best is None or r["val_acc"] > best["val_acc"]):  # type: ignore[operator]
            best = r
    return best


def _title(phase: Phase) -> str:
    cfg = read_config(phase.path)
    name = cfg.get("name", phase.path.name)
    model = cfg.get("model", {}).get("backbone", "?")
    data = cfg.get("data", {})
    where = f"{data.get('dataset', '?')} {data.get('size', '?')}px"
    if phase.kind == "pretrain":
        return f"{name}: pre-training {model} on {where} ({phase.path.name}/)"
    m = cfg.get("meta", {})
    ht = " + hard tasks" if m.get("ht", {}).get("enabled") else ""
    return (
        f"{name}: meta-training {m.get('method', '?')}{ht}, {m.get('way', '?')}-way {m.get('shot', '?')}-shot "
        f"({phase.path.name}/)"
    )


def _pct(values: Sequence[float]) -> list[float]:
    return [100 * v for v in values]


def _draw_pretrain(axes: Sequence[Any], rows: Sequence[Row]) -> None:
    loss_ax, acc_ax = axes
    x, loss = _col(rows, "epoch", "train_loss")
    loss_ax.plot(x, loss, marker="o", color="tab:red", label="training loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    x, acc = _col(rows, "epoch", "train_acc")
    acc_ax.plot(x, _pct(acc), marker="o", color="tab:gray", label="training accuracy (batches)")
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:orange"]
    for i, shot in enumerate(val_shots(rows)):
        pts = [r for r in rows if r.get("epoch") is not None and r.get(f"val_{shot}shot") is not None]
        xs = [float(r["epoch"]) for r in pts]  # type: ignore[arg-type]
        mean = [100 * float(r[f"val_{shot}shot"]) for r in pts]  # type: ignore[arg-type]
        ci = [100 * float(r.get(f"val_{shot}shot_ci") or 0.0) for r in pts]
        color = colors[i % len(colors)]
        acc_ax.plot(xs, mean, marker="o", color=color, label=f"val 5-way {shot}-shot (nearest mean)")
        acc_ax.fill_between(
            xs, [m - c for m, c in zip(mean, ci, strict=True)], [m + c for m, c in zip(mean, ci, strict=True)],
            color=color, alpha=0.2, linewidth=0,
        )  # fmt: skip
    kept = kept_pretrain_row(rows)
    if kept is not None:
        acc_ax.axvline(
            float(kept["epoch"]), color="black", linestyle=":",  # type: ignore[arg-type]
            label=f"kept: epoch {int(kept['epoch'])} (best mean val)",  # type: ignore[arg-type]
        )  # fmt: skip
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set_ylabel("accuracy (%)")


def _draw_meta(axes: Sequence[Any], rows: Sequence[Row]) -> None:
    loss_ax, acc_ax = axes
    x, loss = _col(rows, "tasks", "train_loss")
    loss_ax.plot(x, loss, marker="o", color="tab:red", label="training query loss (mean since last val)")
    loss_ax.set_ylabel("query loss")
    x, qacc = _col(rows, "tasks", "train_query_acc")
    acc_ax.plot(x, _pct(qacc), marker=".", color="tab:gray", linestyle="--", label="training query accuracy")
    pts = [r for r in rows if r.get("tasks") is not None and r.get("val_acc") is not None]
    xs = [float(r["tasks"]) for r in pts]  # type: ignore[arg-type]
    mean = [100 * float(r["val_acc"]) for r in pts]  # type: ignore[arg-type]
    ci = [100 * float(r.get("val_ci") or 0.0) for r in pts]
    acc_ax.plot(xs, mean, marker="o", color="tab:blue", label="val accuracy (95% CI band)")
    acc_ax.fill_between(
        xs, [m - c for m, c in zip(mean, ci, strict=True)], [m + c for m, c in zip(mean, ci, strict=True)],
        color="tab:blue", alpha=0.2, linewidth=0,
    )  # fmt: skip
    kept = kept_meta_row(rows)
    if kept is not None:
        acc_ax.plot(
            [kept["tasks"]], [100 * float(kept["val_acc"])], marker="*", markersize=14, color="gold",  # type: ignore[arg-type]
            markeredgecolor="black", linestyle="none", label=f"kept (task {int(kept['tasks'])})",  # type: ignore[arg-type]
        )  # fmt: skip
    x, hard = _col(rows, "tasks", "hard_tasks")
    if any(hard):
        # Hard tasks follow meta-batches: their running count against ordinary tasks shows where they were learned.
        hard_ax = loss_ax.twinx()
        hard_ax.plot(
            x,
            hard,
            color="tab:orange",
            linestyle="-.",
            marker="x",
            label="hard tasks learned (running total)",
        )
        hard_ax.set_ylabel("hard tasks", color="tab:orange")
        hard_ax.tick_params(axis="y", colors="tab:orange")
        hard_ax.set_ylim(bottom=0)
        hard_ax.yaxis.get_major_locator().set_params(integer=True)
        handles, labels = (
            a + b
            for a, b in zip(
                loss_ax.get_legend_handles_labels(), hard_ax.get_legend_handles_labels(), strict=True
            )
        )
        loss_ax.legend(handles, labels, fontsize=8, loc="best")
    for ax in axes:
        ax.set_xlabel("ordinary meta-training tasks")
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set_ylabel("accuracy (%)")


ROW_HEIGHT_IN, TOP_IN, BOTTOM_IN = 3.6, 0.35, 0.55  # a phase's row; room for its title and x label


def draw_curves(phases: Sequence[Phase]) -> bytes:
    """PNG bytes: one row of two panels (loss | accuracy) per phase.

    A bare `Figure` (no pyplot: safe in any thread, nothing global) with fixed margins instead of
    `tight_layout`, which would draw everything twice; training redraws this at every validation.
    """
    from matplotlib.figure import Figure

    n = len(phases)
    height = ROW_HEIGHT_IN * n
    fig = Figure(figsize=(11, height), dpi=110)
    grid = fig.subplots(n, 2, squeeze=False)
    axis_height = ROW_HEIGHT_IN - TOP_IN - BOTTOM_IN
    fig.subplots_adjust(
        left=0.07,
        right=0.93,
        top=1 - TOP_IN / height,
        bottom=BOTTOM_IN / height,
        wspace=0.3,
        hspace=(TOP_IN + BOTTOM_IN) / axis_height,
    )
    for phase, axes in zip(phases, grid, strict=True):
        axes[0].sharex(axes[1])  # loss and accuracy of a phase on the same epochs / tasks
        if phase.kind == "pretrain":
            _draw_pretrain(axes, phase.rows)
        else:
            _draw_meta(axes, phase.rows)
        axes[0].set_title(_title(phase), loc="left", fontsize=10)
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_curves(run_dir: Path, phases: Sequence[Phase] | None = None) -> Path:
    """(Re)draw `run_dir/curves.png` from the run's metrics; returns its path."""
    phases = find_phases(run_dir) if phases is None else phases
    path = run_dir / CURVES_FILE
    atomic_write_bytes(path, draw_curves(phases))
    return path


# ---- the report ---------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """The run's saved config.yaml as a plain mapping ({} if absent): read, not validated, so an old
    run's report still works after the config schema grows."""
    file = path / "config.yaml"
    if not file.is_file():
        return {}
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The str -> str metadata of a safetensors file's header, without reading its tensors ({} if none)."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _sum(rows: Sequence[Row], key: str) -> float:
    return float(sum(r.get(key) or 0.0 for r in rows))


def _pretrain_entry(phase: Phase, cfg: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in phase.rows if r.get("epoch") is not None]
    kept = kept_pretrain_row(rows)
    weights = phase.path / PRETRAIN_WEIGHTS
    kept_epoch = safetensors_metadata(weights).get("epoch") if weights.is_file() else None
    last = rows[-1] if rows else {}
    rates = [r["images_per_s"] for r in rows if r.get("images_per_s") is not None]
    return {
        "dir": phase.path.name,
        "phase": "pretrain",
        "finished": (phase.path / "DONE").exists(),
        "epochs_done": len(rows),
        "epochs": cfg.get("pretrain", {}).get("epochs"),
        "best_val": None
        if kept is None
        else {
            "epoch": int(kept["epoch"]),  # type: ignore[arg-type]
            **{
                f"{s}shot": {"accuracy": kept[f"val_{s}shot"], "ci95": kept.get(f"val_{s}shot_ci")}
                for s in val_shots(rows)
            },
        },
        "kept": None if kept_epoch is None else {"file": PRETRAIN_WEIGHTS, "epoch": int(kept_epoch)},
        "final_train_loss": last.get("train_loss"),
        "final_train_acc": last.get("train_acc"),
        "time_s": _sum(rows, "epoch_s") + _sum(rows, "val_s"),
        "images_per_s": sum(rates) / len(rates) if rates else None,  # type: ignore[arg-type]
    }


def _meta_entry(phase: Phase, cfg: dict[str, Any]) -> dict[str, Any]:
    rows = phase.rows
    m = cfg.get("meta", {})
    kept = kept_meta_row(rows)
    start = next((r for r in rows if r.get("tasks") == 0 and r.get("val_acc") is not None), None)
    weights = phase.path / META_WEIGHTS
    kept_task = safetensors_metadata(weights).get("tasks") if weights.is_file() else None
    summary = _read_json(phase.path / "summary.json") or {}
    last = rows[-1] if rows else {}
    return {
        "dir": phase.path.name,
        "phase": "meta-train",
        "finished": (phase.path / "DONE").exists(),
        "method": m.get("method"),
        "way": m.get("way"),
        "shot": m.get("shot"),
        "hard_tasks_enabled": bool(m.get("ht", {}).get("enabled")),
        "tasks_done": int(last.get("tasks") or 0),
        "tasks": m.get("tasks"),
        "hard_tasks_done": int(last.get("hard_tasks") or 0),
        "start_val": None if start is None else {"accuracy": start["val_acc"], "ci95": start.get("val_ci")},
        "best_val": None
        if kept is None
        else {"tasks": int(kept["tasks"] or 0), "accuracy": kept["val_acc"], "ci95": kept.get("val_ci")},
        "kept": None if kept_task is None else {"file": META_WEIGHTS, "tasks": int(kept_task)},
        "time_s": summary.get("seconds") if isinstance(summary, dict) else None,
        "tasks_per_s": last.get("tasks_per_s"),
        "results": _results(phase.path),
    }


def _results(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path / "results.json")
    if not isinstance(data, dict):
        return []
    keys = ("split", "way", "shot", "query", "episodes", "seed", "accuracy", "ci95", "seconds")
    return [{k: v.get(k) for k in keys} for v in data.values() if isinstance(v, dict)]


def config_highlights(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings a reader of a report wants first (from a run's config.yaml)."""
    data, model = cfg.get("data", {}), cfg.get("model", {})
    p, m, e = cfg.get("pretrain", {}), cfg.get("meta", {}), cfg.get("eval", {})
    return {
        "name": cfg.get("name"),
        "dataset": data.get("dataset"),
        "scheme": data.get("scheme"),
        "rotations": data.get("rotations"),
        "image_size": data.get("size"),
        "backbone": model.get("backbone"),
        "backbone_args": model.get("backbone_args"),
        "device": cfg.get("device"),
        "precision": cfg.get("precision"),
        "seed": cfg.get("seed"),
        "pretrain": {k: p.get(k) for k in ("epochs", "batch_size", "lr", "schedule", "head")},
        "meta": {
            **{
                k: m.get(k)
                for k in ("method", "way", "query", "tasks", "meta_batch", "inner_steps", "lr_ss", "lr_theta")
            },
            "first_order": m.get("first_order"),
            "hard_tasks": bool(m.get("ht", {}).get("enabled")),
        },
        "eval": {k: e.get(k) for k in ("split", "ways", "shots", "query", "episodes", "seed")},
    }


def build_report(run_dir: Path) -> dict[str, Any]:
    """Everything `mtl report` shows, as JSON-ready data (see module docstring)."""
    phases = find_phases(run_dir)
    entries = []
    for phase in phases:
        cfg = read_config(phase.path)
        entries.append(_pretrain_entry(phase, cfg) if phase.kind == "pretrain" else _meta_entry(phase, cfg))
    first_cfg = read_config(phases[0].path)
    results = [{"model": e["dir"], **r} for e in entries for r in e.get("results", [])]
    times = [e["time_s"] for e in entries if e.get("time_s") is not None]
    times += [r["seconds"] for r in results if r.get("seconds") is not None]
    return {
        "run_dir": str(run_dir),
        "config": config_highlights(first_cfg),
        "phases": entries,
        "results": results,
        "time_s": sum(times),
        "figure": CURVES_FILE,
    }


def _acc(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("accuracy") is None:
        return "-"
    ci = entry.get("ci95")
    return (
        f"{100 * entry['accuracy']:.2f} ± {100 * ci:.2f} %"
        if ci is not None
        else f"{100 * entry['accuracy']:.2f} %"
    )


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _args(args: Any) -> str:
    if not args:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in dict(args).items()) + ")"


def render_markdown(report: dict[str, Any]) -> str:
    """`report.md`: the figure, config highlights, per-phase training, test results (relative links)."""
    c = report["config"]
    p, m, e = c["pretrain"], c["meta"], c["eval"]
    data = f"{c['dataset']}" + (f" ({c['scheme']} split)" if c.get("scheme") else "")
    data += (", rotations" if c.get("rotations") else "") + f", {c['image_size']} px"
    lines = [
        f"# Run report: {c.get('name') or Path(report['run_dir']).name}",
        "",
        f"`{report['run_dir']}`, written from its metrics.csv, config.yaml, summary.json and results.json "
        "(`mtl report` redraws it).",
        "",
        f"![training curves]({report['figure']})",
        "",
        "## Configuration",
        "",
        "| | |",
        "|---|---|",
        f"| data | {data} |",
        f"| backbone | {c['backbone']}{_args(c.get('backbone_args'))} |",
        f"| pre-training | {p['epochs']} epochs, batch {p['batch_size']}, lr {p['lr']} ({p['schedule']}), "
        f"{p['head']} head |",
        f"| meta-training | {m['method']}, {m['way']}-way, {m['tasks']} tasks in meta-batches of "
        f"{m['meta_batch']}, {m['inner_steps']} inner steps, lr Φ {m['lr_ss']}, lr θ {m['lr_theta']}, "
        f"{'first-order' if m['first_order'] else 'exact'} meta-gradient, hard tasks "
        f"{'on' if m['hard_tasks'] else 'off'} |",
        f"| evaluation | {e['split']} split, {e['episodes']} episodes of {e['query']} queries per class, "
        f"seed {e['seed']} |",
        f"| device, precision, seed | {c['device']}, {c['precision']}, {c['seed']} |",
        "",
        "## Training",
        "",
        "| phase | progress | best val accuracy | kept checkpoint | time | throughput |",
        "|---|---|---|---|---|---|",
    ]
    for ph in report["phases"]:
        lines.append(_phase_row(ph))
    lines += ["", "## Test results", ""]
    if report["results"]:
        lines += [
            "| model | split | way | shot | queries | episodes (seed) | accuracy (%) | 95% CI |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["results"]:
            lines.append(
                f"| {r['model']} | {r['split']} | {r['way']} | {r['shot']} | {r['query']} | "
                f"{r['episodes']} ({r['seed']}) | {100 * r['accuracy']:.2f} | ± {100 * r['ci95']:.2f} |"
            )
    else:
        lines.append("No meta-test results in this run yet (`mtl meta-test RUN_DIR` writes them).")
    lines += ["", f"Total time of the phases above: {_seconds(report['time_s'])}.", ""]
    return "\n".join(lines)


def _phase_row(ph: dict[str, Any]) -> str:
    done = "" if ph["finished"] else ", unfinished"
    if ph["phase"] == "pretrain":
        best = ph["best_val"]
        val = (
            "-"
            if best is None
            else "5-way "
            + ", ".join(f"{k[:-4]}-shot {_acc(v)}" for k, v in best.items() if k != "epoch")
            + f" (epoch {best['epoch']})"
        )
        kept = (
            "-" if ph["kept"] is None else f"{ph['dir']}/{ph['kept']['file']} (epoch {ph['kept']['epoch']})"
        )
        rate = "-" if ph["images_per_s"] is None else f"{ph['images_per_s']:.0f} img/s"
        progress = f"{ph['epochs_done']}/{ph['epochs']} epochs{done}"
        return f"| {ph['dir']} | {progress} | {val} | {kept} | {_seconds(ph['time_s'])} | {rate} |"
    best = ph["best_val"]
    val = "-" if best is None else f"{ph['way']}-way {ph['shot']}-shot {_acc(best)} (task {best['tasks']})"
    if ph["start_val"] is not None:
        val += f"; before meta-training {_acc(ph['start_val'])}"
    kept = "-" if ph["kept"] is None else f"{ph['dir']}/{ph['kept']['file']} (task {ph['kept']['tasks']})"
    rate = "-" if ph["tasks_per_s"] is None else f"{ph['tasks_per_s']:.2f} tasks/s"
    hard = f" (+{ph['hard_tasks_done']} hard)" if ph["hard_tasks_enabled"] else ""
    progress = f"{ph['tasks_done']}/{ph['tasks']} tasks{hard}, {ph['method']}{done}"
    return f"| {ph['dir']} | {progress} | {val} | {kept} | {_seconds(ph['time_s'])} | {rate} |"


def write_report(run_dir: Path) -> Path:
    """Redraw `curves.png` and write `report.md` in `run_dir`; returns the report's path."""
    write_curves(run_dir)
    path = run_dir / REPORT_FILE
    atomic_write_text(path, render_markdown(build_report(run_dir)))
    return path


def cmd_report(run_dir: str, as_json: bool) -> str:
    """`mtl report`: (re)draw the figure and return the report as Markdown or JSON text."""
    path = Path(run_dir)
    phases = find_phases(path)
    holders = map(lock_holder, sorted({path, *(ph.path for ph in phases)}))
    busy = [h for h in holders if h is not None and h.training]
    if busy:
        # Its training process redraws curves.png after every row; a second writer would only race it.
        print(
            f"mtl: note: {path / CURVES_FILE} not redrawn: the run is being trained by {busy[0].describe()}",
            file=sys.stderr,
        )
    else:
        with folder_lock(path, "report"):
            write_curves(path, phases)
    report = build_report(path)
    return json.dumps(report, indent=2) if as_json else render_markdown(report)

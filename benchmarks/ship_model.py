"""Ship a finished `mtl run`'s model with the package: export it, measure it, register it.

Usage: ``python benchmarks/ship_model.py RUN_DIR/meta-5shot --name mini-imagenet-32-5shot
--command "mtl run --config configs/mini-imagenet-32.yaml --out RUN_DIR" [--fp16] [--data-root DIR]
[--episodes 20] [--overwrite]``.

1. exports the run's model (`metatransfer.predict.export_model`; `--fp16` stores its tensors in half
   precision) into `src/metatransfer/pretrained/NAME.mtl`;
2. measures how often `mtl predict` on that file agrees with meta-test on the run's own model, over
   `--episodes` episodes of the card's split and seed (`predict_agreement.measure`); with `--fp16` the
   fp32 export is measured too, and fp16 is refused if it agrees on fewer queries;
3. writes the registry entry: sha256 and size, the data and image size, way/shot, the result with its
   95% CI and paired Δ vs NCM from the run's `summary.json` (the row of the run's shot and way), the
   agreement, the exact `--command`, the machine, the training and shipping dates.

The shipped files may total at most 40 MB (`MAX_TOTAL_BYTES`); a model that would pass it is refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from metatransfer import pretrained
from metatransfer.card import now_iso
from metatransfer.cli import _cpu_name
from metatransfer.config import load_config
from metatransfer.device import cpu_has_bf16
from metatransfer.errors import UserError
from metatransfer.models.model_files import MODEL_FILE, read_model_file
from metatransfer.predict import export_model
from metatransfer.runs import CONFIG_FILE, read_json
from predict_agreement import measure

MAX_TOTAL_BYTES = 40 * 10**6
NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")  # timm-like: lowercase words joined by hyphens
DATA_KEYS = ("dataset", "scheme", "rotations", "size")  # what meta-test needs besides the folder


def summary_row(run: Path, way: int, shot: int) -> dict[str, Any]:
    """The row of `mtl run`'s summary.json (in the run's parent folder) for this model's way and shot."""
    path = run.parent / "summary.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; ship a model from mtl run's output (its summary has Δ vs NCM)")
    rows = [r for r in read_json(path) if r.get("way") == way and r.get("shot") == shot]
    if not rows:
        raise UserError(f"{path} has no {way}-way {shot}-shot row; meta-test the run at its own way and shot")
    return max(rows, key=lambda r: r["episodes"])  # the most episodes: the tightest CI


def machine() -> str:
    bf16 = "native bf16" if cpu_has_bf16() else "no native bf16"
    return f"{_cpu_name()}, {os.cpu_count()} cores ({bf16})"


def ship(
    run: Path,
    name: str,
    command: str,
    *,
    fp16: bool = False,
    episodes: int = 20,
    data_root: str | None = None,
    machine_text: str | None = None,
    overwrite: bool = False,
    folder: Path | None = None,
) -> pretrained.ShippedModel:
    """Export, measure and register `run` (a meta-train run folder of `mtl run`) as `name`; see module doc."""
    folder = pretrained.FOLDER if folder is None else folder
    if not NAME.fullmatch(name):
        raise UserError(f"--name {name!r}: use lowercase letters, digits and hyphens, e.g. omniglot-5shot")
    if not (run / MODEL_FILE).is_file() or not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run} is not a finished meta-train run (no {MODEL_FILE} or {CONFIG_FILE})")
    known = pretrained.registry(folder)
    if name in known and not overwrite:
        raise UserError(f"{name} is already shipped; pass --overwrite to replace it")
    cfg = load_config(run / CONFIG_FILE)
    row = summary_row(run, cfg.meta.way, cfg.meta.shot)
    target = folder / f"{name}.mtl"
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(run, Path(tmp) / "model.mtl", fp16=fp16)
        settings: dict[str, Any] = {k: row[k] for k in ("split", "way", "shot", "query", "seed")}
        settings.update(episodes=episodes, data_root=data_root)
        agreement = measure(run, exported, Path(tmp) / "episodes", **settings)
        print(f"{name}: mtl predict agrees with meta-test on {agreement['agree']} of {agreement['queries']}")
        if fp16:
            full = export_model(run, Path(tmp) / "fp32.mtl")
            reference = measure(run, full, Path(tmp) / "episodes32", **settings)
            print(f"{name}: the fp32 export agrees on {reference['agree']} of {reference['queries']}")
            if agreement["agree"] < reference["agree"]:
                raise UserError(
                    f"{name}: fp16 storage agrees with meta-test on {agreement['agree']} queries, fp32 on "
                    f"{reference['agree']}; ship it without --fp16"
                )
        others = sum(m.size_bytes for m in known.values() if m.name != name)
        size = exported.stat().st_size
        if others + size > MAX_TOTAL_BYTES:
            raise UserError(
                f"{name}: {size / 1e6:.1f} MB would bring the shipped models to {(others + size) / 1e6:.1f} MB, "
                f"over {MAX_TOTAL_BYTES / 1e6:.0f} MB; try --fp16"
            )
        shutil.move(exported, target)  # a copy when the temporary folder is on another file system
    return _register(run, name, command, cfg, row, agreement, target, fp16, machine_text, folder)


def _register(
    run: Path,
    name: str,
    command: str,
    cfg: Any,
    row: dict[str, Any],
    agreement: dict[str, Any],
    target: Path,
    fp16: bool,
    machine_text: str | None,
    folder: Path,
) -> pretrained.ShippedModel:
    pre = read_model_file(target).pre  # the shipped file itself: also proves it loads
    trained = dt.datetime.fromtimestamp((run / MODEL_FILE).stat().st_mtime, tz=dt.timezone.utc)
    model = pretrained.ShippedModel(
        name=name,
        file=target.name,
        sha256=pretrained.sha256(target),
        size_bytes=target.stat().st_size,
        storage="fp16" if fp16 else "fp32",
        dataset=cfg.data.dataset,
        data={k: getattr(cfg.data, k) for k in DATA_KEYS},
        image_size=pre.size,
        channels=pre.channels,
        way=cfg.meta.way,
        shot=cfg.meta.shot,
        result=pretrained.CardResult(
            **{k: row[k] for k in ("split", "way", "shot", "query", "episodes", "seed")},
            **{
                k: float(row[k])
                for k in ("accuracy", "ci95", "ncm_accuracy", "delta_vs_ncm", "delta_vs_ncm_ci95")
            },
        ),
        agreement=pretrained.Agreement(
            **{k: agreement[k] for k in ("agree", "queries", "episodes", "split", "seed", "precision")}
        ),
        command=command,
        machine=machine_text or machine(),
        trained=trained.isoformat(timespec="seconds"),
        shipped=now_iso(),
    )
    pretrained.write_entry(model, folder)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "run_dir", help="the meta-train folder of a finished mtl run, e.g. runs/omniglot/meta-5shot"
    )
    parser.add_argument("--name", required=True, help="the shipped name, e.g. omniglot-5shot")
    parser.add_argument(
        "--command", required=True, help="the exact command that trained it, recorded in the card"
    )
    parser.add_argument("--fp16", action="store_true", help="store the tensors in fp16 (half the size)")
    parser.add_argument(
        "--episodes", type=int, default=20, help="episodes of the agreement check (default 20)"
    )
    parser.add_argument("--data-root", help="where the dataset is now, if not where it was at training")
    parser.add_argument("--machine", help="the machine that trained it (default: this one)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a model already shipped under --name"
    )
    args = parser.parse_args(argv)
    try:
        model = ship(
            Path(args.run_dir),
            args.name,
            args.command,
            fp16=args.fp16,
            episodes=args.episodes,
            data_root=args.data_root,
            machine_text=args.machine,
            overwrite=args.overwrite,
        )
    except UserError as exc:
        print(f"ship_model: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(model.to_json(), indent=2))
    print(pretrained.describe(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

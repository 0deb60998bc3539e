"""Model cards: what a meta-trained model is, in the model file itself (`mtl info MODEL`).

A card is a JSON object: the data it learned from (dataset, scheme, split names), the image size and
channels, the backbone, the method and its task shape, the whole training config (local paths left
out: they mean nothing on another machine), the meta-test results the run holds with their protocol
and 95% CI, the metatransfer and torch versions, and the creation date. `mtl export` stores it under
the `card` key of the `.mtl` file's metadata; for a run directory it is built from the run's files.
Files exported before cards existed have none and still load (`card` is None).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from metatransfer.errors import UserError
from metatransfer.report import META_WEIGHTS, read_config, safetensors_metadata

CARD_KEY = "card"  # metadata key of an exported file
CARD_VERSION = 1
LOCAL_PATHS = ("root", "cache_dir")  # data.* keys left out of the card's config


def package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def protocol(r: dict[str, Any], inner_steps: Any) -> str:
    """How a meta-test number was measured, in one sentence."""
    return (
        f"{r.get('way')}-way {r.get('shot')}-shot, {r.get('query')} queries per class, "
        f"{r.get('episodes')} episodes (seed {r.get('seed')}) of the {r.get('split')} split; base learner "
        f"adapted {inner_steps} steps per episode; mean query accuracy, 95% CI = 1.96·std/√episodes"
    )


def build_card(model_file: Path, created: str | None = None) -> dict[str, Any]:
    """The card of a meta-train run's `model.safetensors` (config and results from its folder).

    `created`: ISO date to record (default: the model file's modification time).
    """
    from metatransfer import __version__

    info = safetensors_metadata(model_file)
    if "meta" not in info or "preprocess" not in info:
        raise UserError(f"{model_file} is not a meta-trained metatransfer model (no 'meta' metadata)")
    run_dir = model_file.parent
    cfg = read_config(run_dir)
    data = dict(cfg.get("data", {}))
    for key in LOCAL_PATHS:
        data.pop(key, None)
    if cfg:
        cfg = {**cfg, "data": data}
    meta = json.loads(info["meta"])
    pre = json.loads(info["preprocess"])
    results_file = run_dir / "results.json"
    raw = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else {}
    keys = ("split", "way", "shot", "query", "episodes", "seed", "accuracy", "ci95")
    results = [
        {**{k: r.get(k) for k in keys}, "protocol": protocol(r, meta.get("inner_steps_test"))}
        for r in raw.values()
        if isinstance(r, dict)
    ]
    if created is None:
        stamp = dt.datetime.fromtimestamp(model_file.stat().st_mtime, tz=dt.timezone.utc)
        created = stamp.isoformat(timespec="seconds")
    return {
        "card_version": CARD_VERSION,
        "name": cfg.get("name"),
        "dataset": {
            "name": info.get("dataset", data.get("dataset")),
            "scheme": data.get("scheme"),
            "rotations": data.get("rotations"),
            "splits": {
                "train": "train",
                "selection": "val",
                "tested": sorted({str(r["split"]) for r in results}),
            },
        },
        "image_size": pre["size"],
        "channels": pre["channels"],
        "backbone": {"name": info.get("backbone"), "args": json.loads(info.get("backbone_args", "{}"))},
        "method": meta.get("method"),
        "way": meta.get("way"),
        "shot": meta.get("shot"),
        "kept_at_task": int(info["tasks"]) if info.get("tasks", "").isdigit() else None,
        "training_config": cfg or None,
        "results": results,
        "metatransfer_version": __version__,
        "torch_version": package_version("torch"),
        "python_version": platform.python_version(),
        "created": created,
    }


def now_iso() -> str:
    return dt.datetime.now(tz=dt.timezone.utc).isoformat(timespec="seconds")


def card_from_metadata(info: dict[str, str]) -> dict[str, Any] | None:
    """The card stored in an exported file's metadata, or None for files exported before cards."""
    text = info.get(CARD_KEY)
    if not text:
        return None
    try:
        card = json.loads(text)
    except json.JSONDecodeError:
        return None
    return card if isinstance(card, dict) else None


def describe(model: str | Path) -> dict[str, Any]:
    """`mtl info`'s data: {"path", "kind" ("export" or "run"), "format_version", "card" (None if absent),
    "metadata" (the basics every file has)} for an exported file, a run directory or a model.safetensors."""
    from metatransfer.models.model_files import read_model_file

    path = Path(model)
    if path.is_dir():
        path = path / META_WEIGHTS
    if not path.is_file():
        raise UserError(f"no model at {path}; pass an exported .mtl file or a meta-train run directory")
    model_file = read_model_file(path)  # validated like every model file: one line for a broken one
    if model_file.kind == "backbone":
        raise UserError(f"{path} is a pre-trained backbone; pass an exported .mtl file or a meta-train run")
    info = model_file.info
    exported = model_file.kind == "export"
    card = card_from_metadata(info) if exported else build_card(path)
    basics = {
        k: info[k] for k in ("backbone", "backbone_args", "dataset", "preprocess", "precision") if k in info
    }
    return {
        "path": str(path),
        "kind": "export" if exported else "run",
        "format_version": info.get("format_version"),
        "card": card,
        "metadata": basics,
    }


def render(desc: dict[str, Any]) -> str:
    """`mtl info`'s text: the card in a few lines, or the basics and a note for a file without one."""
    card = desc["card"]
    kind = (
        f"exported model, format {desc['format_version']}"
        if desc["kind"] == "export"
        else "run directory model"
    )
    lines = [f"model: {desc['path']} ({kind})"]
    if card is None:
        basics = desc["metadata"]
        pre = json.loads(basics.get("preprocess", "{}") or "{}")
        lines += [
            f"backbone: {basics.get('backbone')} {basics.get('backbone_args', '')}".rstrip(),
            f"dataset: {basics.get('dataset')}, images {pre.get('size')} px x {pre.get('channels')} channel(s)",
            "no model card: the file was exported before metatransfer wrote cards; "
            "export it again from its run to add one",
        ]
        return "\n".join(lines)
    d = card["dataset"]
    data = d["name"] + (f" ({d['scheme']} split)" if d.get("scheme") else "")
    data += ", with rotations" if d.get("rotations") else ""
    args = ", ".join(f"{k}={v}" for k, v in (card["backbone"].get("args") or {}).items())
    kept = card.get("kept_at_task")
    lines += [
        f"name: {card.get('name')}; created {card.get('created')} with metatransfer "
        f"{card.get('metatransfer_version')}, torch {card.get('torch_version')}",
        f"data: {data}; images {card['image_size']} px, {card['channels']} channel(s); "
        f"trained on the '{d['splits']['train']}' split, model chosen on '{d['splits']['selection']}'",
        f"backbone: {card['backbone']['name']}" + (f" ({args})" if args else ""),
        f"method: {card.get('method')}, meta-trained {card.get('way')}-way {card.get('shot')}-shot"
        + (f", kept at task {kept}" if kept is not None else ""),
    ]
    if card.get("results"):
        lines.append("meta-test results:")
        for r in card["results"]:
            lines.append(f"  {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} %: {r['protocol']}")
    else:
        lines.append("meta-test results: none held in the run")
    cfg = card.get("training_config")
    if cfg:
        p, m = cfg.get("pretrain", {}), cfg.get("meta", {})
        lines.append(
            f"training: pre-training {p.get('epochs')} epochs (batch {p.get('batch_size')}, lr {p.get('lr')}), "
            f"meta-training {m.get('tasks')} tasks (lr Φ {m.get('lr_ss')}, θ {m.get('lr_theta')}); "
            "the whole config: mtl info --json"
        )
    return "\n".join(lines)

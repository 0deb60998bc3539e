"""Models shipped with the package: `metatransfer.load("omniglot-5shot")`, `mtl predict NAME`, `mtl models`.

Each is an exported `.mtl` file in this folder, listed in `registry.json` under its name with its sha256,
what it learned from (dataset, image size, way/shot), its meta-test result with the 95% CI and the
paired difference from nearest class mean (NCM), how far `mtl predict` on the file agrees with
meta-test, and how it was made (the exact command, machine, dates). `benchmarks/ship_model.py` adds
one from a finished `mtl run`.

A name resolves only to the file its entry lists, in this folder, and only while the file's sha256 is
the recorded one: a corrupt or replaced file is refused (`ChecksumError`), never silently loaded.
A string with a path separator, or one naming an existing file or folder that is not a shipped name,
is a path as before (`./NAME` forces a local folder called like a shipped model).

This module imports no torch, so `mtl models` starts quickly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metatransfer.errors import ChecksumError, ModelFileError, UnknownModelError

FOLDER = Path(__file__).resolve().parent  # where the shipped files and the registry live
REGISTRY_FILE = "registry.json"
MODEL_SUFFIXES = (".mtl", ".safetensors")  # a missing path with these is a path, not an unknown name


@dataclass(frozen=True)
class CardResult:
    """The meta-test result the model is shipped with: `accuracy` ± `ci95` (fractions, 95% CI over
    `episodes`) on `split` episodes of `seed`, and the paired difference from NCM on the phase-1
    features over the same episodes."""

    split: str
    way: int
    shot: int
    query: int
    episodes: int
    seed: int
    accuracy: float
    ci95: float
    ncm_accuracy: float
    delta_vs_ncm: float
    delta_vs_ncm_ci95: float


@dataclass(frozen=True)
class Agreement:
    """How often `mtl predict` on the shipped file gives the class meta-test's batched inner loop gives
    the run's own model, over `queries` queries of `episodes` episodes (`split`, `seed`), at
    `precision` on the machine that shipped it."""

    agree: int
    queries: int
    episodes: int
    split: str
    seed: int
    precision: str


@dataclass(frozen=True)
class ShippedModel:
    """One registry entry. `data` holds the data settings meta-test needs besides the folder
    (dataset, scheme, rotations, size); `storage` is the float type of the file's tensors."""

    name: str
    file: str  # a file name inside FOLDER
    sha256: str
    size_bytes: int
    storage: str  # "fp32" or "fp16"
    dataset: str
    data: dict[str, Any]
    image_size: int
    channels: int
    way: int
    shot: int
    result: CardResult
    agreement: Agreement
    command: str  # the command that trained it, as run
    machine: str
    trained: str  # ISO date of the run's model file
    shipped: str  # ISO date of the registry entry

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShippedModel:
        return cls(
            **{
                **obj,
                "result": CardResult(**obj["result"]),
                "agreement": Agreement(**obj["agreement"]),
            }
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def registry_path(folder: Path | None = None) -> Path:
    return (FOLDER if folder is None else folder) / REGISTRY_FILE


def registry(folder: Path | None = None) -> dict[str, ShippedModel]:
    """The shipped models by name (empty when the folder has no registry); ModelFileError if it is broken."""
    path = registry_path(folder)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        models = {name: ShippedModel.from_json(entry) for name, entry in raw["models"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path} is not a valid model registry ({type(exc).__name__}: {exc})") from exc
    for name, m in models.items():
        # Only a plain file name in this folder: an entry can never point elsewhere on the disk.
        if m.name != name or Path(m.file).name != m.file or m.file in ("", ".", ".."):
            raise ModelFileError(f"{path}: entry {name!r} is malformed (name or file {m.file!r})")
    return models


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_file(model: ShippedModel, folder: Path | None = None) -> Path:
    """The shipped model's file, after checking it exists and has the recorded sha256."""
    path = (FOLDER if folder is None else folder) / model.file
    if not path.is_file():
        raise ModelFileError(
            f"shipped model {model.name!r}: its file {path} is missing; reinstall metatransfer"
        )
    got = sha256(path)
    if got != model.sha256:
        raise ChecksumError(
            f"shipped model {model.name!r}: {path} has sha256 {got[:12]}..., the registry records "
            f"{model.sha256[:12]}...; the file is corrupt or was replaced, reinstall metatransfer"
        )
    return path


def unknown_name_message(name: str, known: list[str]) -> str:
    shipped = ", ".join(known) if known else "none in this installation"
    return (
        f"{name!r} is neither a shipped model nor an existing file or folder; shipped models: {shipped} "
        "(or pass an exported .mtl file or a meta-train run directory)"
    )


def resolve(model: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """(the file or folder to load, the shipped name or None) for a name or a path.

    A string without a path separator that a registry entry names -> its verified file. Anything
    else is a path; a string that looks like a name (no separator, no model suffix) and names
    nothing on disk raises UnknownModelError, one line listing the shipped names.
    """
    if isinstance(model, str) and "/" not in model and os.sep not in model:
        models = registry()
        if model in models:
            return verified_file(models[model]), model
        path = Path(model)
        if not path.exists() and path.suffix not in MODEL_SUFFIXES:
            raise UnknownModelError(unknown_name_message(model, sorted(models)))
    return Path(model), None


def write_entry(model: ShippedModel, folder: Path | None = None) -> Path:
    """Add or replace `model`'s entry in the registry (entries sorted by name); returns the registry path."""
    from metatransfer.runs import write_json  # atomic; imports torch, which shipping needs anyway

    models = registry(folder)
    models[model.name] = model
    path = registry_path(folder)
    write_json(path, {"models": {name: models[name].to_json() for name in sorted(models)}})
    return path


def format_table(models: dict[str, ShippedModel]) -> str:
    """`mtl models`: name, dataset, image size, way/shot, card accuracy with CI and Δ vs NCM."""
    rows = [("name", "dataset", "size", "task", "accuracy (95% CI)", "Δ vs NCM", "split")]
    for m in models.values():
        r = m.result
        rows.append(
            (
                m.name,
                m.dataset,
                f"{m.image_size} px",
                f"{r.way}-way {r.shot}-shot",
                f"{100 * r.accuracy:.2f} ± {100 * r.ci95:.2f}",
                f"{100 * r.delta_vs_ncm:+.2f} ± {100 * r.delta_vs_ncm_ci95:.2f}",
                f"{r.split} ({r.episodes} ep.)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def describe(model: ShippedModel) -> str:
    """`mtl info NAME`'s lines about the shipped model: its card result, agreement and provenance."""
    r, a = model.result, model.agreement
    return "\n".join(
        [
            f"shipped as {model.name} ({model.file}, {model.storage}, {model.size_bytes / 2**20:.1f} MiB, "
            f"sha256 {model.sha256})",
            f"  result: {100 * r.accuracy:.2f} ± {100 * r.ci95:.2f} % on {r.episodes} {r.way}-way {r.shot}-shot "
            f"episodes of {r.split} (seed {r.seed}); NCM {100 * r.ncm_accuracy:.2f} %, "
            f"Δ {100 * r.delta_vs_ncm:+.2f} ± {100 * r.delta_vs_ncm_ci95:.2f} (paired)",
            f"  mtl predict agrees with meta-test on {a.agree} of {a.queries} queries "
            f"({a.episodes} {a.split} episodes, seed {a.seed}, {a.precision})",
            f"  trained with: {model.command}",
            f"  on {model.machine}, {model.trained}; shipped {model.shipped}",
        ]
    )

"""Run directories and the files in them: atomic writes, a lock, safe weights, metrics CSV.

Every file is written to a temporary name in the same folder, flushed to disk and renamed, so a crash
(or a full disk) leaves either the old file or the new one, never a truncated one. Weights are
safetensors; resume state, which needs torch's format for optimiser state, is read with
`weights_only=True`, which refuses pickled code.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metatransfer.config import Config, to_yaml
from metatransfer.errors import UserError

CONFIG_FILE = "config.yaml"
DONE_FILE = "DONE"
LOCK_FILE = ".lock"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"missing file: {path}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def save_weights(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors as safetensors (atomically); `metadata` is a str -> str map stored in the header."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(flat, metadata=dict(metadata) if metadata else None))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file; refuse anything else (such as a pickle) with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{path} is not a safetensors file; metatransfer loads weights only as safetensors"
        ) from exc
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return tensors, dict(header.get("__metadata__") or {})


def save_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save resume state (optimiser, scheduler, RNG, counters) atomically in torch's format."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    """Load resume state with `weights_only=True`: tensors and plain containers only, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"resume state not found: {path}") from exc
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError for foreign pickles
        raise UserError(
            f"refusing to load {path}: it holds objects other than tensors and plain data "
            f"(loading it could run code); delete it or resume from another run"
        ) from exc
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a metatransfer resume state")
    return state


class RunDir:
    """A run's output folder, locked against a second process while in use.

    `open` refuses to reuse a finished run unless `overwrite`; an unfinished run of the same config
    is resumed (`resuming` is True); an unfinished run of a different config is refused.
    """

    def __init__(self, path: Path, lock: IO[str] | None, resuming: bool) -> None:
        self.path = path
        self._lock = lock
        self.resuming = resuming

    @classmethod
    def open(
        cls,
        path: str | Path,
        cfg: Config,
        *,
        overwrite: bool = False,
        resume: bool | None = None,
    ) -> RunDir:
        """Create or reopen the run folder `path` for `cfg`; `resume=None` resumes automatically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        handle = _acquire_lock(path)
        try:
            resuming = cls._prepare(path, cfg, overwrite=overwrite, resume=resume)
        except BaseException:
            handle.close()
            raise
        return cls(path, handle, resuming)

    @staticmethod
    def _prepare(path: Path, cfg: Config, *, overwrite: bool, resume: bool | None) -> bool:
        saved = path / CONFIG_FILE
        if overwrite:
            for child in path.iterdir():
                if child.name != LOCK_FILE and child.is_file():
                    child.unlink()
            atomic_write_text(saved, to_yaml(cfg))
            return False
        if (path / DONE_FILE).exists():
            raise UserError(
                f"{path} holds a finished run; pass --overwrite to replace it or choose another --out"
            )
        if saved.exists():
            same = saved.read_text(encoding="utf-8") == to_yaml(cfg)
            has_state = any(path.glob("state*.pt"))
            if not same and (has_state or resume):
                raise UserError(
                    f"{path} holds an unfinished run of a different config; pass --overwrite or choose another --out"
                )
            if resume is False and has_state:
                raise UserError(
                    f"{path} holds an unfinished run; pass --resume to continue it or --overwrite"
                )
            atomic_write_text(saved, to_yaml(cfg))
            return same and has_state
        if resume:
            raise UserError(f"nothing to resume in {path}: it holds no run")
        atomic_write_text(saved, to_yaml(cfg))
        return False

    def file(self, name: str) -> Path:
        return self.path / name

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the run finished (so it is not overwritten by accident) and drop resume state."""
        write_json(self.file(DONE_FILE), dict(summary or {}))
        for state in self.path.glob("state*.pt"):
            state.unlink()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_finished(path: str | Path, cfg: Config) -> bool:
    """Whether `path` holds a finished run of exactly `cfg` (so a pipeline can reuse it)."""
    path = Path(path)
    saved = path / CONFIG_FILE
    return (
        (path / DONE_FILE).exists() and saved.exists() and saved.read_text(encoding="utf-8") == to_yaml(cfg)
    )


def _acquire_lock(path: Path) -> IO[str]:
    handle = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise UserError(
            f"{path} is in use by another metatransfer process (lock file {path / LOCK_FILE})"
        ) from exc
    return handle


class MetricsLog:
    """One CSV row per epoch/evaluation; the file is rewritten atomically so it is never half a row.

    Columns are the union of all keys seen, in first-seen order. On resume, existing rows are kept.
    """

    def __init__(self, path: str | Path, *, resume: bool = False, keep_until: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume and self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                self.rows = list(csv.DictReader(f))
            if keep_until is not None:
                # Rows logged after the checkpoint we resume from will be produced again.
                self.rows = [r for r in self.rows if int(float(r.get("step", 0) or 0)) <= keep_until]

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
        atomic_write_text(self.path, buf.getvalue())


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value

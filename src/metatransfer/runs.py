"""Run directories and the files in them: atomic writes, a lock, safe weights, metrics CSV.

Every file is written to a temporary name in the same folder, flushed to disk and renamed, so a crash
(or a full disk) leaves either the old file or the new one, never a truncated one. Weights are
safetensors; resume state, which needs torch's format for optimiser state, is read with
`weights_only=True`, which refuses pickled code.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import fnmatch
import io
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metatransfer.config import Config, Phase, load_config, phase_inputs, to_yaml
from metatransfer.errors import TrainingError, UserError, file_error

CONFIG_FILE = "config.yaml"
DONE_FILE = "DONE"
LOCK_FILE = ".lock"
# Serialises read-modify-write of the marker between processes: the run lock cannot, since the training
# process holds it for hours while other commands (meta-test, report) also add files.
MARKER_LOCK = ".metatransfer.lock"
LOCK_FILES = (LOCK_FILE, MARKER_LOCK)
# How long a short writer (meta-test saving results, report, export) waits for another short writer.
SHORT_WAIT_S = 120.0
# Our mark on every output folder we create: {"format": MARKER_FORMAT, "files": [names we wrote there]}.
# Only a marked folder is reused, and `--overwrite` removes only the files its list names.
MARKER_FILE = ".metatransfer.json"
MARKER_FORMAT = "metatransfer-output"
# What a run folder written before the marker existed holds (recognised by its config.yaml, see `_owned`).
LEGACY_RUN_FILES = (
    CONFIG_FILE,
    DONE_FILE,
    "metrics.csv",
    "summary.json",
    "results.json",
    "failure_classes.csv",
    "episodes-*.csv",
    "state*.pt",
    "*.safetensors",
)


def atomic_write_bytes(path: str | Path, data: bytes, *, record: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    Any OSError (disk full, read-only, a file where a folder should be) is a FileError naming `path`.
    In a folder we marked (`claim_folder`), the file's name is added to the marker's list of the run's
    files (which `--overwrite` may remove), unless `record` is False (a file the user asked for by name).
    """
    path = Path(path)
    try:
        _write_replace(path, data)
    except OSError as exc:
        raise file_error(exc, path, "write") from exc
    if record and path.name != MARKER_FILE:
        _record(path)


def _write_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Created as open() would (0666 under the umask), not mkstemp's 0600, so run files stay shareable.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (byte {exc.start}); it was not written by metatransfer"
        ) from exc
    except OSError as exc:
        raise file_error(exc, path, "read") from exc


# --- output folders: only ever reuse or clean what we wrote --------------------------------------------------


def _marker(folder: Path) -> dict[str, Any] | None:
    """The marker of `folder` if it holds a valid one, else None."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("format") != MARKER_FORMAT
        or not isinstance(data.get("files"), list)
    ):
        return None
    return data


def _write_marker(folder: Path, files: list[str]) -> None:
    text = json.dumps({"format": MARKER_FORMAT, "files": sorted(set(files))}, indent=1) + "\n"
    atomic_write_text(folder / MARKER_FILE, text)


@contextlib.contextmanager
def _marker_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s marker lock: every read-modify-write of the marker happens inside it, so two
    processes adding files at once both end up listed."""
    handle = _open_lock(folder / MARKER_LOCK)
    try:
        if not _flock(handle, SHORT_WAIT_S):
            raise UserError(
                f"{folder}: another process has held {MARKER_LOCK} for over {SHORT_WAIT_S:.0f} s; "
                "if no metatransfer command is running there, try again"
            )
        yield
    finally:
        handle.close()


def _record(path: Path) -> None:
    """Add `path`'s name to its folder's marker (if the folder is marked): it is now a file we wrote."""
    if _marker(path.parent) is None:  # cheap test first: most folders we write to are not ours to list
        return
    with _marker_lock(path.parent):
        marker = _marker(path.parent)
        if marker is not None and path.name not in marker["files"]:
            _write_marker(path.parent, [*marker["files"], path.name])


def _forget(folder: Path, names: set[str]) -> None:
    """Drop `names` (files we deleted) from `folder`'s marker, so it lists exactly the files present."""
    with _marker_lock(folder):
        marker = _marker(folder)
        if marker is not None and names & set(marker["files"]):
            _write_marker(folder, [n for n in marker["files"] if n not in names])


def record_file(path: str | Path) -> None:
    """List `path`, written by other code than `atomic_write_bytes` (TensorBoard's event files), among
    its folder's run files, so `--overwrite` removes it with the rest."""
    _record(Path(path))


def _is_legacy_run(folder: Path) -> bool:
    """A run folder from before the marker: its config.yaml is exactly what `to_yaml` writes for it."""
    from metatransfer.config import build_config, read_yaml

    try:
        text = (folder / CONFIG_FILE).read_text(encoding="utf-8")
        return to_yaml(build_config([read_yaml(folder / CONFIG_FILE)])) == text
    except (OSError, ValueError, UserError):
        return False


def _legacy_files(folder: Path) -> list[str]:
    """The files of a legacy folder that metatransfer wrote (by name): a run's outputs, or none."""
    if not _is_legacy_run(folder):
        return []
    names = [p.name for p in folder.iterdir() if p.is_file()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in LEGACY_RUN_FILES)]


def _owned(folder: Path) -> bool:
    """Whether `folder` was written by metatransfer: marked, a legacy run, or holding a legacy run."""
    if _marker(folder) is not None or _is_legacy_run(folder):
        return True
    return any(
        child.is_dir() and (_marker(child) is not None or _is_legacy_run(child)) for child in folder.iterdir()
    )


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def claim_folder(path: str | Path, *, data_root: str | Path | None = None) -> Path:
    """Make `path` an output folder of ours: create it, or reuse it only if metatransfer wrote it.

    Refused (one line): a folder inside `data_root` (the dataset: outputs must never land among its
    images), an existing file, or a non-empty folder without our marker (a plain folder of the user's).
    The folder gets our marker; from then on every file written there by `atomic_write_bytes` is listed.
    """
    path = check_output(path, data_root=data_root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error(exc, path, "create the output folder") from exc
    if _marker(path) is None:
        with _marker_lock(path):
            if _marker(path) is None:  # another process may have marked it while we waited
                for stale in path.glob(f".{MARKER_FILE}.*.tmp"):  # a process killed while marking it
                    stale.unlink(missing_ok=True)
                _write_marker(path, _legacy_files(path))
    return path


def _marker_temp(name: str) -> bool:
    """Whether `name` is the temporary file of a marker being written (left by a process killed then)."""
    return name.startswith(f".{MARKER_FILE}.") and name.endswith(".tmp")


def check_output(path: str | Path, *, data_root: str | Path | None = None) -> Path:
    """Refuse `path` as an output folder unless it is new, empty or ours (see `claim_folder`); writes nothing."""
    path = Path(path)
    if data_root is not None and _inside(path, Path(data_root)):
        raise UserError(
            f"output folder {path} is inside the dataset folder {data_root}; choose another --out"
        )
    try:
        if not path.exists():
            return path
        if not path.is_dir():
            raise UserError(f"output folder {path} exists and is not a folder; choose another --out")
        entries = sorted(
            p.name
            for p in path.iterdir()
            if p.name not in (MARKER_FILE, *LOCK_FILES) and not _marker_temp(p.name)
        )
        if entries and not _owned(path):
            raise UserError(
                f"{path} holds files metatransfer did not write (e.g. {entries[0]}); "
                "such a folder is never reused or cleaned, choose a new or empty --out"
            )
    except OSError as exc:
        raise file_error(exc, path, "read the output folder") from exc
    return path


def run_file_owner(path: str | Path) -> Path | None:
    """The run folder `path` is one of the own files of (listed in its marker, or a legacy run's), or None."""
    path = Path(path)
    folder = path.parent
    marker = _marker(folder)
    ours = marker["files"] if marker is not None else _legacy_files(folder) if folder.is_dir() else []
    return folder if path.name in ours else None


def remove_our_files(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete the files the marker of `folder` lists (and their leftover temp files), except `keep`.

    Nothing else in the folder is touched: files a user added there stay.
    """
    if _marker(folder) is None:
        raise UserError(f"{folder} is not a metatransfer output folder; refusing to remove anything in it")
    with _marker_lock(folder):
        marker = _marker(folder)
        assert marker is not None  # marked folders stay marked: only this function rewrites a marker's list
        names = [n for n in marker["files"] if n not in keep and "/" not in n and n not in (".", "..")]
        for child in folder.iterdir():
            ours = child.name in names or any(
                child.name.startswith(f".{n}.") and child.name.endswith(".tmp") for n in names
            )
            if ours and child.is_file() and not child.is_symlink():
                child.unlink()
        _write_marker(folder, [n for n in marker["files"] if n in keep])


def save_weights(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    record: bool = True,
) -> None:
    """Save tensors as safetensors (atomically); `metadata` is a str -> str map stored in the header.

    Non-finite weights are never written (TrainingError): the file on disk stays the last good one.
    """
    _check_finite(path, tensors)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(flat, metadata=dict(metadata) if metadata else None), record=record)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file; refuse anything else (such as a pickle) with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise file_error(exc, path, "read") from exc
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{path} is not a safetensors file; metatransfer loads weights only as safetensors"
        ) from exc
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return tensors, dict(header.get("__metadata__") or {})


def _non_finite(value: Any, key: str = "") -> str | None:
    """The key of the first floating-point tensor in `value` (nested dicts/lists) holding NaN or inf."""
    if isinstance(value, torch.Tensor):
        return key if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    items = (
        value.items()
        if isinstance(value, Mapping)
        else enumerate(value)
        if isinstance(value, list | tuple)
        else ()
    )
    for k, v in items:
        found = _non_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def _check_finite(path: str | Path, state: Mapping[str, Any]) -> None:
    """TrainingError if any tensor of `state` is not finite: such a state is never saved."""
    bad = _non_finite(state)
    if bad is not None:
        step = f" at step {state['step']}" if "step" in state else ""
        raise TrainingError(
            f"{bad} holds NaN or infinite values{step}, so {Path(path).name} was not saved; the last good "
            "checkpoint is kept. Lower the learning rate or use precision=fp32"
        )


def save_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save resume state (optimiser, scheduler, RNG, counters) atomically in torch's format.

    A state holding a non-finite tensor (a diverged update) is refused with TrainingError, so the file
    on disk is always the last finite one.
    """
    _check_finite(path, state)
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
    (as far as its phase reads it, see `phase_inputs`) is resumed (`resuming` is True); an unfinished
    run of a different config is refused.
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
        phase: Phase,
        *,
        overwrite: bool = False,
        resume: bool | None = None,
    ) -> RunDir:
        """Create or reopen the run folder `path` for `cfg`; `resume=None` resumes automatically.

        Only a folder metatransfer wrote is reused (see `claim_folder`), never one inside the dataset.
        """
        path = claim_folder(path, data_root=cfg.data.root)
        handle = _acquire_lock(path, f"{TRAINING} ({phase})")
        try:
            resuming = cls._prepare(path, cfg, phase, overwrite=overwrite, resume=resume)
        except BaseException:
            handle.close()
            raise
        return cls(path, handle, resuming)

    @staticmethod
    def _prepare(path: Path, cfg: Config, phase: Phase, *, overwrite: bool, resume: bool | None) -> bool:
        saved = path / CONFIG_FILE
        if overwrite and resume:
            raise UserError(
                "resume and overwrite contradict each other (resume keeps the run, overwrite deletes it)"
            )
        if overwrite:
            remove_our_files(path)
            atomic_write_text(saved, to_yaml(cfg))
            return False
        if (path / DONE_FILE).exists():
            raise UserError(
                f"{path} holds a finished run; pass --overwrite to replace it or choose another --out"
            )
        if saved.exists():
            same = _same_inputs(path, cfg, phase)
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
        states = list(self.path.glob("state*.pt"))
        for state in states:
            state.unlink()
        _forget(self.path, {state.name for state in states})

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_finished(path: str | Path, cfg: Config, phase: Phase) -> bool:
    """Whether `path` holds a finished `phase` run of `cfg`, as far as the phase reads it (so a pipeline
    can reuse it: `mtl run` with a new meta section keeps the pre-trained backbone)."""
    path = Path(path)
    return (path / DONE_FILE).exists() and _same_inputs(path, cfg, phase)


def _same_inputs(run: Path, cfg: Config, phase: Phase) -> bool:
    """Whether the run in `run` was made from the same settings as `cfg`, of those `phase` reads."""
    text = _saved_config(run)
    if text is None:
        return False
    if text == to_yaml(cfg):
        return True
    try:
        saved = load_config(run / CONFIG_FILE)
    except UserError:  # a config this version cannot read was not made from `cfg`
        return False
    return phase_inputs(saved, phase) == phase_inputs(cfg, phase)


def _saved_config(run: Path) -> str | None:
    """The text of a run's config.yaml, None if it has none; undecodable bytes never equal a config we write."""
    try:
        return (run / CONFIG_FILE).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise file_error(exc, run / CONFIG_FILE, "read") from exc


TRAINING = "training"  # what the run lock's holder writes when it trains the run (see `LockHolder`)


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder's lock, as the holder wrote it in the lock file: its pid and its task."""

    pid: int | None
    task: str

    @property
    def training(self) -> bool:
        return self.task.startswith(TRAINING)

    def describe(self) -> str:
        who = f"process {self.pid}" if self.pid else "another metatransfer process"
        return f"{who} ({self.task})" if self.task else who


def _open_lock(path: Path) -> IO[str]:
    try:
        return open(path, "a+")  # noqa: SIM115 - the caller holds it open as long as it holds the lock
    except OSError as exc:
        raise file_error(exc, path, "write") from exc


def _flock(handle: IO[str], wait: float) -> bool:
    """Take an exclusive flock on `handle`, retrying for up to `wait` seconds; whether it was taken."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def lock_holder(folder: str | Path) -> LockHolder | None:
    """Who holds `folder`'s run lock now, or None when nobody does. Writes nothing."""
    path = Path(folder) / LOCK_FILE
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise file_error(exc, path, "read") from exc
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, task = handle.read(200).strip().partition(" ")
            return LockHolder(int(pid) if pid.isdigit() else None, task)
        return None


def _acquire_lock(path: Path, task: str) -> IO[str]:
    """Take `path`'s run lock for `task`, or refuse at once naming its holder; our pid and task go into the
    lock file, so that a process refused later can say who holds it."""
    handle = _open_lock(path / LOCK_FILE)
    if not _flock(handle, 0.0):
        handle.close()
        holder = lock_holder(path)
        what = holder.describe() if holder else "another metatransfer process"
        raise UserError(
            f"{path} is in use by {what} (lock file {path / LOCK_FILE}); wait for it to end or stop it"
        )
    _write_holder(handle, task)
    return handle


def _write_holder(handle: IO[str], task: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {task}\n")
    handle.flush()


@contextlib.contextmanager
def folder_lock(folder: str | Path, task: str) -> Iterator[None]:
    """Hold `folder`'s run lock while a short command (`task`: meta-test, report, export) writes there.

    Another short writer is waited for (up to SHORT_WAIT_S); a training process holds the lock for the
    whole run, so then this refuses at once (UserError naming its pid and what to do).
    """
    folder = Path(folder)
    handle = _open_lock(folder / LOCK_FILE)
    try:
        deadline = time.monotonic() + SHORT_WAIT_S
        while not _flock(handle, 0.0):
            holder = lock_holder(folder)
            if holder is not None and holder.training:
                raise UserError(
                    f"{folder} is being trained by {holder.describe()}; nothing was written into it. "
                    "Wait for the training to finish, or write elsewhere (meta-test: --out)"
                )
            if time.monotonic() >= deadline:
                what = holder.describe() if holder else "another metatransfer process"
                raise UserError(
                    f"{folder} has been in use by {what} for over {SHORT_WAIT_S:.0f} s; try again"
                )
            time.sleep(0.05)
        _write_holder(handle, task)
        yield
    finally:
        handle.close()


def lock_if_ours(folder: str | Path, task: str) -> contextlib.AbstractContextManager[None]:
    """`folder_lock` when `folder` is an output folder of ours (a file the user names, such as an export,
    may land in a run folder), else nothing to lock."""
    return folder_lock(folder, task) if _marker(Path(folder)) is not None else contextlib.nullcontext()


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

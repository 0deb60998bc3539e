"""Commands that share a run folder or an image cache at the same time, each a real process.

- a run folder's lock refuses a second trainer, naming the pid that holds it;
- several processes adding files to one folder all end up in its marker, and `--overwrite` then
  removes exactly those files;
- two processes building the same cache entry on a fresh cache both get the complete entry;
- `mtl meta-test` on a run another process is training writes nothing into it and says the model is
  unfinished; with `--out` its results go there;
- a soak: 4 meta-tests, an export and a report on one finished run at once.

Every wait is bounded: a process that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metatransfer.cli import main
from metatransfer.runs import LOCK_FILES, MARKER_FILE

from tiny import write_config, write_pattern_folder

TIMEOUT = 240  # seconds any one process may take before the test fails


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MTL_PROGRESS": "off", **extra}


def _mtl(*args: str) -> list[str]:
    return [sys.executable, "-m", "metatransfer", *args]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _start(cmd: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{proc.args} did not finish within {TIMEOUT} s") from None
    return proc.returncode, out, err


def _wait_for(condition: object, what: str, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _marker_files(folder: Path) -> set[str]:
    return set(json.loads((folder / MARKER_FILE).read_text())["files"])


def _present(folder: Path) -> set[str]:
    """The files in `folder` other than the marker and lock files."""
    return {p.name for p in folder.iterdir() if p.is_file() and p.name not in (MARKER_FILE, *LOCK_FILES)}


# --- contradictory flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume", "--overwrite"], "--resume and --overwrite contradict"),
        (["--data-root", "x", "--set", "data.root=y"], "--data-root and --set data.root"),
        (["--tensorboard", "--set", "logging.tensorboard=false"], "--tensorboard contradicts"),
    ],
)
def test_contradictory_flags_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = write_pattern_folder(tmp_path / "data", per_class=6)
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "cache")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # refused before any work


# --- the run lock between two processes --------------------------------------------------------------

HOLD_RUN = """
import sys, time
from pathlib import Path
from metatransfer.config import load_config
from metatransfer.runs import RunDir
with RunDir.open(Path(sys.argv[1]), load_config(sys.argv[2]), "pretrain"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    data = write_pattern_folder(tmp_path / "data")
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "cache")
    out = tmp_path / "run"
    holder = _start([*_python(HOLD_RUN), str(out), str(config)])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        done = subprocess.run(
            _mtl("pretrain", "--config", str(config), "--out", str(out)),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 2
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and f"in use by process {holder.pid} (training (pretrain))" in err[0], err
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)
    # The lock dies with its process: the same command now gets the folder.
    assert (
        subprocess.run(
            _python(HOLD_RUN.replace("time.sleep(120)", "pass")) + [str(out), str(config)],
            env=_env(),
            timeout=TIMEOUT,
        ).returncode
        == 0
    )


# --- the marker under several writers -----------------------------------------------------------------

WRITE_FILES = """
import sys, time
from pathlib import Path
from metatransfer.runs import atomic_write_text
folder, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 120
while not (folder.parent / "go").exists():  # start together: the writes must overlap
    assert time.monotonic() < deadline
    time.sleep(0.01)
for i in range(n):
    atomic_write_text(folder / f"{me}-{i}.txt", "x")
"""


@pytest.mark.slow
def test_several_processes_writing_one_folder_are_all_listed_and_overwrite_removes_them(
    tmp_path: Path,
) -> None:
    from metatransfer.runs import claim_folder, remove_our_files

    folder = claim_folder(tmp_path / "out")
    writers, per_writer = 4, 40
    procs = [_start([*_python(WRITE_FILES), str(folder), f"w{k}", str(per_writer)]) for k in range(writers)]
    time.sleep(1.0)  # let the interpreters start, so the writes overlap
    (tmp_path / "go").touch()
    for proc in procs:
        rc, _, err = _finish(proc)
        assert rc == 0, err
    written = {f"w{k}-{i}.txt" for k in range(writers) for i in range(per_writer)}
    assert _present(folder) == written
    assert _marker_files(folder) == written  # no writer's entry was lost to another's rewrite
    (folder / "notes.txt").write_text("the user's")  # not ours: survives --overwrite
    remove_our_files(folder)
    assert _present(folder) == {"notes.txt"}
    assert _marker_files(folder) == set()


# --- two processes building one cache entry ----------------------------------------------------------

BUILD_CACHE = """
import hashlib, sys, time
from pathlib import Path
from metatransfer.data.store import load_or_build
root, go = sys.argv[1], Path(sys.argv[2])
deadline = time.monotonic() + 120
while not go.exists():
    assert time.monotonic() < deadline
    time.sleep(0.01)
store, bad = load_or_build("image-folder", root, "train", size=28, workers=1, progress=False)
assert not bad
digest = hashlib.sha256(store.images.tobytes() + store.offsets.tobytes()).hexdigest()
print(digest, len(store), flush=True)
"""


def test_two_processes_building_the_same_cache_get_the_complete_entry(tmp_path: Path) -> None:
    data = write_pattern_folder(tmp_path / "data", per_class=120)  # ~1000 images: the builds overlap
    go = tmp_path / "go"
    fresh = tmp_path / "cache"
    procs = [_start([*_python(BUILD_CACHE), str(data), str(go)], MTL_CACHE_DIR=str(fresh)) for _ in range(2)]
    time.sleep(1.0)
    go.touch()
    outputs = []
    for proc in procs:
        rc, out, err = _finish(proc)
        assert rc == 0, err
        outputs.append(out.split())
    # The same digest as a build alone, in another cache: complete, identical, never half-built.
    alone = subprocess.run(
        [*_python(BUILD_CACHE), str(data), str(go)],
        env=_env(MTL_CACHE_DIR=str(tmp_path / "alone")),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert alone.returncode == 0, alone.stderr
    assert outputs[0] == outputs[1] == alone.stdout.split()
    assert outputs[0][1] == str(8 * 120)
    names = sorted(p.suffix for p in fresh.iterdir())
    assert names == [".json", ".npy"], names  # one entry, no temporary left
    (npy,) = fresh.glob("*.npy")
    digest = hashlib.sha256(
        np.load(npy).tobytes()
        + np.asarray(json.loads(npy.with_suffix(".json").read_text())["offsets"]).tobytes()
    )
    assert digest.hexdigest() == outputs[0][0]


# --- meta-test, export and report against a run in use ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(folder, config, finished pre-training run) on the tiny dataset, in fp32."""
    tmp = tmp_path_factory.mktemp("concurrency")
    data = write_pattern_folder(tmp / "data")
    config = write_config(
        tmp / "cfg.yaml",
        data,
        tmp / "cache",
        pretrain={"epochs": 1, "val_episodes": 5},
        meta={"tasks": 8, "val_every": 4, "val_episodes": 5},
    )
    pre = tmp / "pre"
    done = subprocess.run(
        _mtl("pretrain", "--config", str(config), "--out", str(pre), "--set", "precision=fp32"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return tmp, config, pre


def _meta_train(trained: tuple[Path, Path, Path], out: Path, *settings: str) -> list[str]:
    _, config, pre = trained
    sets = [arg for s in ("precision=fp32", *settings) for arg in ("--set", s)]
    return _mtl("meta-train", "--config", str(config), "--pretrained", str(pre), "--out", str(out), *sets)


@pytest.mark.slow
def test_meta_test_of_a_run_in_training_writes_nothing_into_it(trained: tuple[Path, Path, Path]) -> None:
    tmp = trained[0]
    run = tmp / "training"
    trainer = _start(_meta_train(trained, run, "meta.tasks=100000"))  # it trains as long as the test runs
    try:
        _wait_for(lambda: (run / "model.safetensors").exists() or trainer.poll() is not None, "a model file")
        assert trainer.poll() is None, _finish(trainer)[2]
        before = {
            p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name.startswith(("results", "episodes"))
        }
        marker = _marker_files(run)
        args = ("meta-test", str(run), "--way", "3", "--query", "4", "--episodes", "10")
        rc, out, err = _finish(_start(_mtl(*args)))
        assert rc == 0, err
        assert "unfinished run: model at task " in out and " of 100000" in out, out
        assert "chosen on val episodes" not in out  # never presented as the kept model
        assert not any(p.name.startswith(("results", "episodes")) for p in run.iterdir()), before
        assert not {n for n in _marker_files(run) - marker if n.startswith(("results", "episodes"))}
        # With --out, the results go there and only there.
        rc, out, err = _finish(_start(_mtl(*args, "--out", str(tmp / "peek"))))
        assert rc == 0, err
        assert "unfinished run" in out
        assert json.loads((tmp / "peek" / "results.json").read_text())
        assert not (run / "results.json").exists()
        # --out pointed at the run itself is refused, naming the trainer's pid.
        rc, _, err = _finish(_start(_mtl(*args, "--out", str(run))))
        assert rc == 2 and f"process {trainer.pid}" in err and len(err.strip().splitlines()) == 1, err
        # report does not redraw the figure the trainer owns, and says so.
        rc, _, err = _finish(_start(_mtl("report", str(run))))
        assert rc == 0 and "not redrawn" in err and f"process {trainer.pid}" in err, err
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=TIMEOUT)


@pytest.mark.slow
def test_soak_four_meta_tests_an_export_and_a_report_at_once(trained: tuple[Path, Path, Path]) -> None:
    tmp = trained[0]
    run = tmp / "finished"
    done = subprocess.run(
        _meta_train(trained, run),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 60  # the soak's time bound: a second round only if the first was quick
    rounds = 0
    while rounds == 0 or (time.monotonic() < deadline and rounds < 2):
        procs = [
            _start(
                _mtl(
                    "meta-test",
                    str(run),
                    "--way",
                    "3",
                    "--query",
                    "4",
                    "--episodes",
                    "10",
                    "--shot",
                    str(1 + k % 2),
                    "--seed",
                    str(k),
                )
            )
            for k in range(4)
        ]
        procs.append(_start(_mtl("export", str(run), "--out", str(tmp / f"model-{rounds}.mtl"))))
        procs.append(_start(_mtl("report", str(run), "--json")))
        for proc in procs:
            rc, out, err = _finish(proc)
            lines = err.strip().splitlines()
            assert rc == 0 or (rc == 2 and len(lines) == 1), (proc.args, rc, err)
        rounds += 1
        results = json.loads((run / "results.json").read_text())
        assert len(results) >= 1
        for name in ("episodes-test-3way-1shot.csv", "episodes-test-3way-2shot.csv"):
            with (run / name).open(newline="") as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == 10 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
        assert (tmp / f"model-{rounds - 1}.mtl").stat().st_size > 0
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        assert _marker_files(run) == _present(run)
    # Every setting's result survived the others' read-modify-write of results.json.
    assert len(json.loads((run / "results.json").read_text())) == 4

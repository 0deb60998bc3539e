"""Every reproduction of the reliability report (issue 16) through the `mtl` command: one line on stderr,
exit status 2, no traceback (unless --debug), and nothing written where it should not be."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metatransfer.cli import main

from tiny import write_config, write_pattern_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    data = write_pattern_folder(tmp / "data", per_class=6)
    config = write_config(
        tmp / "tiny.yaml", data, tmp / "cache", pretrain={"epochs": 1, "val_episodes": 2, "val_shots": [1]}
    )
    return config, tmp


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("mtl:") or "Traceback" in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mtl: error:"), err
    return lines[0]


# Numbers without range checks (item 6) and invalid values that used to "succeed" (item 7).
SETTINGS = {
    "pretrain.batch_size=0": "'pretrain.batch_size' must be in [1,",
    "pretrain.batch_size=-4": "'pretrain.batch_size' must be in [1,",
    "pretrain.augment.crop_scale=[1]": "'pretrain.augment.crop_scale' needs 2 values",
    "pretrain.augment.crop_scale=[2,3]": "'pretrain.augment.crop_scale[0]' must be in (0, 1]",
    "pretrain.augment.crop_scale=[1,0.5]": "'pretrain.augment.crop_scale' must be in increasing order",
    "pretrain.val_episodes=0": "'pretrain.val_episodes' must be in [1,",
    "data.size=4": "'data.size' is 4, but backbone conv4 needs images of at least 16 px",
    "seed=1e23": "'seed' expects int",
    "seed=100000000000000000000000": "'seed' must be in [0,",
    "pretrain.lr=-1": "'pretrain.lr' must be in (0, 100]",
    "pretrain.label_smoothing=5": "'pretrain.label_smoothing' must be in [0, 1)",
    "meta.val_every=0": "'meta.val_every' must be in [1,",
    "meta.inner_steps=-1": "'meta.inner_steps' must be in [0,",
    "meta.val_episodes=0": "'meta.val_episodes' must be in [1,",
    "meta.lr_ss=.nan": "'meta.lr_ss' must be in [0, 100], got nan",
    "pretrain.epochs=0": "'pretrain.epochs' must be in [1,",
    "meta.tasks=0": "'meta.tasks' must be in [1,",
    "meta.tasks=-5": "'meta.tasks' must be in [1,",
    "eval.ways=[9]": "'test' has 5 classes, fewer than the 9-way episodes of eval.ways",
    "meta.way=9": "'train' has 8 classes, fewer than the 9-way episodes of meta.way",
    "eval.query=20": "pretrain.val_shots + eval.query need 21 images per class, but a class of",
    "meta.query=9": "meta.way, meta.shot + meta.query need 10 images per class, but a class of",
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_bad_value_is_refused_before_any_work(
    setting: str, tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, tmp = tiny
    out = tmp / "runs" / setting.replace("/", "_")
    line = _one_line_error(
        main(["run", "--config", str(config), "--out", str(out), "--set", setting]), capsys
    )
    assert SETTINGS[setting] in line, line
    assert not out.exists()  # refused before the first phase started


ARGUMENTS = {
    ("meta-test", "RUN", "--episodes", "0"): "argument --episodes must be in [1,",
    ("meta-test", "RUN", "--way", "1"): "argument --way must be in [2,",
    ("meta-test", "RUN", "--shot", "x"): "argument --shot expects an integer, got 'x'",
    ("meta-test", "RUN", "--set", "meta.inner_steps_test=5"): "--set meta.inner_steps_test would be ignored",
    (
        "ablate",
        "--config",
        "CFG",
        "--pretrained",
        "P",
        "--shots",
        "a,b",
    ): "argument --shots expects an integer",
    (
        "ablate",
        "--config",
        "CFG",
        "--pretrained",
        "P",
        "--episodes",
        "0",
    ): "argument --episodes must be in [1,",
    ("predict", "M", "--support", "S", "--query", "Q", "--top-k", "0"): "argument --top-k must be in [1,",
    ("data", "check", "glyphs", "--size", "-1"): "argument --size must be in [1,",
    ("pretrain",): "the following arguments are required: --config",
}


@pytest.mark.parametrize("argv", sorted(ARGUMENTS), ids=" ".join)
def test_a_bad_argument_is_one_line(
    argv: tuple[str, ...], tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, tmp = tiny
    args = [str(config) if a == "CFG" else str(tmp / a) if a in ("RUN", "P") else a for a in argv]
    line = _one_line_error(main(args), capsys)
    assert ARGUMENTS[argv] in line, line


def test_debug_shows_the_traceback(tiny: tuple[Path, Path]) -> None:
    config, tmp = tiny
    from metatransfer.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrain.epochs"):
        main(["--debug", "run", "--config", str(config), "--set", "pretrain.epochs=0"])


# Unwritable outputs (item 5).
def _outs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "a-file").write_text("x")
    return {
        "an existing file": (tmp / "a-file", "exists and is not a folder"),
        "under a file": (tmp / "a-file" / "run", "Not a directory"),
        "under /proc": (Path("/proc/mtl-run"), "/proc/mtl-run"),
        "under /sys": (Path("/sys/mtl-run"), "/sys/mtl-run"),
    }


@pytest.mark.parametrize("where", ["an existing file", "under a file", "under /proc", "under /sys"])
def test_an_unwritable_out_is_one_line(
    where: str, tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, tmp = tiny
    out, message = _outs(tmp)[where]
    if not out.parent.exists():
        pytest.skip(f"{out.parent} does not exist here")
    line = _one_line_error(main(["pretrain", "--config", str(config), "--out", str(out)]), capsys)
    assert message in line, line


def test_a_full_disk_while_writing_a_run_is_one_line_and_keeps_earlier_files(
    tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, tmp = tiny
    out = tmp / "full"
    real = os.replace

    def replace(src: str, dst: str, *args: object, **kwargs: object) -> None:
        if Path(dst).name == "metrics.csv":  # the disk fills when the first metrics row is written
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    line = _one_line_error(main(["pretrain", "--config", str(config), "--out", str(out)]), capsys)
    assert f"cannot write {out / 'metrics.csv'}: No space left on device" in line, line
    assert (out / "config.yaml").read_text().startswith("name: tiny")  # written earlier, intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(
    subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unprivileged user and mount namespaces to mount a read-only tmpfs",
)
def test_an_out_on_a_read_only_mount_is_one_line(tiny: tuple[Path, Path]) -> None:
    config, _ = tiny
    cmd = f"{sys.executable} -m metatransfer pretrain --config {config} --out /mnt/run"
    script = f"mount -t tmpfs -o ro,size=100k tmpfs /mnt && {cmd}; echo rc=$?"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env)
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert err == ["mtl: error: cannot create the output folder /mnt/run: Read-only file system"], done.stderr


# Config files (item 9).
def test_a_non_utf8_config_and_a_non_utf8_run_config_are_one_line(
    tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, tmp = tiny
    bad = tmp / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    line = _one_line_error(main(["run", "--config", str(bad)]), capsys)
    assert f"config file {bad} is not UTF-8 text" in line
    run = tmp / "old-run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00name")
    line = _one_line_error(main(["meta-test", str(run)]), capsys)
    assert f"config file {run / 'config.yaml'} is not UTF-8 text" in line


def test_a_yaml_alias_bomb_is_refused_quickly_and_never_printed(
    tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, tmp = tiny
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    levels.append("model:\n  backbone_args:\n    widths: [*i, *i, *i, *i, *i, *i, *i, *i, *i, *i]")
    bomb = tmp / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    import time

    started = time.perf_counter()
    line = _one_line_error(main(["run", "--config", str(bomb)]), capsys)
    assert time.perf_counter() - started < 5
    assert "expands to more than 100000 values" in line and len(line) < 300

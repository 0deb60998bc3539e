"""Progress display: bars on a terminal, throttled status lines in a log, silence on request."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from metatransfer import progress
from metatransfer.errors import UserError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_override", None)
    monkeypatch.delenv(progress.ENV_VAR, raising=False)


def test_mode_follows_stderr_then_env_then_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", Stream(tty=True))
    assert progress.mode() == "bar"
    monkeypatch.setattr(sys, "stderr", Stream(tty=False))
    assert progress.mode() == "lines"
    monkeypatch.setenv(progress.ENV_VAR, "bar")
    assert progress.mode() == "bar"
    progress.set_mode("off")
    assert progress.mode() == "off"
    assert isinstance(progress.track(10, "x", "step"), progress.Silent)
    monkeypatch.setenv(progress.ENV_VAR, "sometimes")
    progress.set_mode(None)
    with pytest.raises(UserError, match="MTL_PROGRESS='sometimes' is not one of bar, lines, off"):
        progress.mode()


def test_lines_at_most_one_per_interval(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    lines = progress.Lines(300, "pretrain epoch 3/12", "step", interval=30.0, clock=clock)
    for step in range(300):
        clock.now = step * 0.5  # 150 s in all: lines at 30, 60, 90, 120 s
        lines.update(1, loss=2.5712, acc=0.3301, img_s=570)
    lines.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert err[0] == "pretrain epoch 3/12 step 61/300 loss 2.571 acc 0.330 570 img/s"
    assert "\r" not in "".join(err)


def test_short_loop_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    lines = progress.Lines(5, "features val", "batch", clock=clock)
    for _ in range(5):
        clock.now += 1.0
        lines.update(1)
    assert capsys.readouterr().err == ""


def test_note_goes_to_stdout_unless_off(capsys: pytest.CaptureFixture[str]) -> None:
    progress.set_mode("lines")
    progress.note("epoch 1/2: loss 1.000")
    assert capsys.readouterr().out == "epoch 1/2: loss 1.000\n"
    progress.set_mode("off")
    progress.note("epoch 2/2: loss 0.500")
    assert capsys.readouterr().out == ""


def test_disabled_rank_is_silent_whatever_the_mode() -> None:
    progress.set_mode("bar")
    assert isinstance(progress.track(10, "x", "step", enabled=False), progress.Silent)


SCRIPT = """
from metatransfer import progress
progress.LINE_INTERVAL_S = 0.0
bar = progress.track(5, "pretrain epoch 1/1", "step")
for i in range(5):
    bar.update(1, loss=1.0 / (i + 1))
bar.close()
progress.note("epoch 1/1: done")
"""


def _run(stderr: int, extra: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """SCRIPT in a fresh interpreter with its stderr on `stderr`; MTL_PROGRESS only if `extra` sets it."""
    env = {k: v for k, v in os.environ.items() if k != progress.ENV_VAR}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), **extra)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        timeout=120,
        check=True,
    )


def test_a_terminal_gets_a_bar_and_a_pipe_gets_lines() -> None:
    parent, child = pty.openpty()
    # A new pty is 0 columns wide, where tqdm draws nothing; give it a terminal's size.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        _run(child, {})
        os.close(child)
        child = -1
        chunks = []
        while True:
            try:
                data = os.read(parent, 4096)
            except OSError:  # EIO once the child side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(parent)
        if child >= 0:
            os.close(child)
    tty = b"".join(chunks).decode()
    assert "\r" in tty and "5/5" in tty and "|" in tty  # tqdm redraws one line in place
    piped = _run(subprocess.PIPE, {})
    err = piped.stderr.decode().splitlines()
    assert err == [f"pretrain epoch 1/1 step {i}/5 loss {1.0 / i:.3f}" for i in range(1, 6)]
    assert piped.stdout.decode() == "epoch 1/1: done\n"
    forced = _run(subprocess.PIPE, {progress.ENV_VAR: "off"})
    assert forced.stderr == b"" and forced.stdout == b""


def test_quiet_silences_a_command_and_only_that_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from metatransfer import cli

    seen: list[str] = []

    def fake(args: object) -> int:
        seen.append(progress.mode())
        progress.note("epoch 1/1: a note")
        print("result")
        return 0

    monkeypatch.setattr(cli, "cmd_datasets", fake)
    for argv in (["--quiet", "datasets"], ["datasets", "--quiet"], ["datasets"]):
        assert cli.main(argv) == 0
    assert seen == ["off", "off", "lines"]  # captured stderr is not a terminal
    assert capsys.readouterr().out == "result\nresult\nepoch 1/1: a note\nresult\n"
    assert progress.mode() == "lines"

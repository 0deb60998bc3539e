"""Progress that fits where it goes: tqdm bars on a terminal, plain status lines in a log, or nothing.

The mode is chosen once per loop by `track` (and once per message by `note`):

- `set_mode` (what `mtl --quiet` calls) wins, then `$MTL_PROGRESS` (`bar`, `lines` or `off`),
- else `bar` when stderr is a terminal and `lines` when it is not (a file, a pipe, CI, `nohup`).

In `lines` mode a loop prints nothing while it is short: a status line such as
`pretrain epoch 3/12 step 200/300 loss 2.570 acc 0.330 570 img/s` appears at most every
`LINE_INTERVAL_S` seconds, so a log holds the per-epoch and per-validation notes plus a heartbeat,
never one line per refresh. `off` prints neither bars, status lines nor notes (results still are).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from metatransfer.errors import UserError

ENV_VAR = "MTL_PROGRESS"
MODES = ("bar", "lines", "off")
LINE_INTERVAL_S = 30.0  # at most one status line per loop in this many seconds

_override: str | None = None


def set_mode(mode: str | None) -> None:
    """Force a mode for this process (None: back to $MTL_PROGRESS / terminal detection)."""
    if mode is not None and mode not in MODES:
        raise UserError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
    global _override
    _override = mode


@contextlib.contextmanager
def forced(mode: str | None) -> Iterator[None]:
    """`set_mode(mode)` inside the block (None: leave the mode alone), the previous mode after it."""
    previous = _override
    if mode is not None:
        set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


def mode() -> str:
    """The mode in force now: `set_mode`'s, else $MTL_PROGRESS's, else bar on a terminal, lines off one."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env not in MODES:
            raise UserError(f"{ENV_VAR}={env!r} is not one of {', '.join(MODES)}")
        return env
    return "bar" if _isatty(sys.stderr) else "lines"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class Progress(Protocol):
    """What a loop reports to: `update(n, **fields)` after each unit of work, `close()` at the end."""

    def update(self, n: int = 1, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Silent:
    """Progress that shows nothing (`off`, or a rank other than 0)."""

    def update(self, n: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bar:
    """A tqdm bar on stderr; `fields` become its postfix (`loss=2.570, img_s=570`)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, leave: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave)

    def update(self, n: int = 1, **fields: Any) -> None:
        self._bar.update(n)
        if fields:
            self._bar.set_postfix({k: _text(v) for k, v in fields.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lines:
    """Plain status lines on stderr, at most one per `interval` seconds, none for a loop shorter than that.

    `clock` is injectable so tests need not sleep.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        interval: float | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self._clock = clock
        self._last = clock()

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            print(status_line(self.desc, self.n, self.total, self.unit, fields), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def status_line(desc: str, n: int, total: int, unit: str, fields: Mapping[str, Any]) -> str:
    """`pretrain epoch 3/12 step 200/300 loss 2.570 acc 0.330 570 img/s`: a field named `x_s` is a rate
    and reads `value x/s`; others read `name value`."""
    parts = [desc, f"{unit} {n}/{total}" if total else f"{n} {unit}"]
    for name, value in fields.items():
        if name.endswith("_s"):
            parts.append(f"{_text(value)} {name[:-2]}/s")
        else:
            parts.append(f"{name} {_text(value)}")
    return " ".join(p for p in parts if p)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def track(
    total: int, desc: str, unit: str, *, initial: int = 0, leave: bool = True, enabled: bool = True
) -> Bar | Lines | Silent:
    """The progress display for one loop of `total` units, in the mode in force (see module docstring).

    `enabled=False` (e.g. ranks other than 0) is silent whatever the mode; `leave=False` bars vanish
    when closed (inner loops such as feature extraction).
    """
    current = mode()
    if not enabled or current == "off":
        return Silent()
    if current == "bar":
        return Bar(total, desc, unit, initial=initial, leave=leave)
    return Lines(total, desc, unit, initial=initial)


def note(message: str) -> None:
    """A line worth keeping in the log (an epoch's or a validation's figures): printed on stdout without
    breaking a bar that is showing; dropped when progress is `off`."""
    current = mode()
    if current == "off":
        return
    if current == "bar":
        from tqdm import tqdm

        tqdm.write(message)
    else:
        print(message, flush=True)

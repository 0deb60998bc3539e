"""A run's metrics log plus what is drawn from it: `curves.png` after every row, TensorBoard scalars.

`RunLog` is a `MetricsLog` (one CSV row per epoch or validation) that, each time a row is appended,
redraws the run directory's `curves.png` and, with `logging.tensorboard`, writes the row's numbers
as TensorBoard scalars (tag = CSV column, step = the row's `step`) into event files in the same
folder, so `tensorboard --logdir runs/NAME` shows every phase as its own run.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metatransfer.errors import UserError
from metatransfer.report import METRICS_FILE, write_curves
from metatransfer.runs import MetricsLog, record_file

NOT_SCALARS = ("step", "epoch", "tasks")  # the x axes, not curves of their own
EVENTS_GLOB = "events.out.tfevents.*"

TENSORBOARD_HINT = (
    "TensorBoard logging needs the tensorboard package, which is not installed; "
    "pip install 'metatransfer[tensorboard]' (or drop --tensorboard / logging.tensorboard)"
)


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard() -> None:
    """Raise UserError (one line, exit 2 in the CLI) when the tensorboard package is missing."""
    if not tensorboard_installed():
        raise UserError(TENSORBOARD_HINT)


class RunLog(MetricsLog):
    """metrics.csv of `run_dir`, with `curves.png` redrawn and TensorBoard scalars written per row."""

    def __init__(
        self,
        run_dir: Path,
        *,
        resume: bool = False,
        keep_until: int | None = None,
        tensorboard: bool = False,
    ) -> None:
        super().__init__(run_dir / METRICS_FILE, resume=resume, keep_until=keep_until)
        self.run_dir = run_dir
        self._warned = False
        self._writer: Any = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            before = set(run_dir.glob(EVENTS_GLOB))
            self._writer = SummaryWriter(log_dir=str(run_dir))
            for events in set(run_dir.glob(EVENTS_GLOB)) - before:
                record_file(events)  # a run file like the others: `--overwrite` removes it

    def append(self, row: Mapping[str, Any]) -> None:
        super().append(row)
        try:
            write_curves(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a figure must never stop a training run
            if not self._warned:
                print(f"mtl: warning: could not draw {self.run_dir / 'curves.png'}: {exc}", file=sys.stderr)
                self._warned = True
        if self._writer is not None:
            step = int(float(row.get("step", len(self.rows))))
            for name, value in row.items():
                if name not in NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(name, float(value), step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

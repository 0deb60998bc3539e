"""The bench table: every figure as the median over rounds, every speed-up as median [min–max], and the
speed-ups set against the previous run written to the same folder (are they holding still?)."""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from timing import Row

STEADY = 0.15  # two runs' speed-up medians this close (relative) count as the same figure


def add_only(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    parser.add_argument(
        "--only", default=",".join(sections), help=f"comma-separated subset of {', '.join(sections)}"
    )


def only(parser: argparse.ArgumentParser, text: str, sections: Sequence[str]) -> list[str]:
    """The sections named in ``text``, in run order; a usage error names any unknown one."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(sections))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections)}")
    return [s for s in sections if s in names]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's machine name."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def speedup_text(row: Row) -> str:
    s = row.speedup
    return "—" if s is None else s.text("x")


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| figure | unit | reference (original loop), median | project, median | speed-up, median [min–max] |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ref, proj = statistics.median(r.reference), statistics.median(r.project)
        lines.append(f"| {r.figure} | {r.unit} | {fmt(ref)} | {fmt(proj)} | {speedup_text(r)} |")
    return lines


def compare(rows: Sequence[Row], previous: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Each speed-up's median against the same figure's in ``previous`` (a bench.json payload).

    ``apart`` is |this - previous| / previous; ``steady`` says whether it is within STEADY.
    """
    if not previous:
        return []
    before = {r["figure"]: r["speedup"] for r in previous.get("rows", []) if r.get("speedup")}
    out = []
    for r in rows:
        s, old = r.speedup, before.get(r.figure)
        if s is None or old is None:
            continue
        was = float(old["median"] if isinstance(old, Mapping) else old)  # older runs: a plain number
        apart = abs(s.median - was) / was
        out.append(
            {
                "figure": r.figure,
                "median": s.median,
                "previous": was,
                "apart": apart,
                "steady": apart <= STEADY,
            }
        )
    return out


def comparison_lines(
    comparison: Sequence[Mapping[str, Any]], previous: Mapping[str, Any] | None
) -> list[str]:
    if not previous:
        return [
            "No earlier run in this folder to compare with: run `make bench` again to check that the ratios hold still."
        ]
    info = previous.get("info", {})
    if not comparison:
        return [
            f"The earlier run in this folder ({info.get('date')}) has no speed-up of the same figures to compare."
        ]
    lines = [
        f"Against the previous run in this folder ({info.get('date')}, {info.get('seconds', 0):.0f} s): each speed-up's "
        f"median now and then, and how far apart (steady: within {100 * STEADY:.0f} %).",
        "",
        "| figure | median now | median before | apart | steady |",
        "|---|---:|---:|---:|---|",
    ]
    for c in comparison:
        steady = "yes" if c["steady"] else "**no**"
        lines.append(
            f"| {c['figure']} | {c['median']:.2f}x | {c['previous']:.2f}x | {100 * c['apart']:.0f} % | {steady} |"
        )
    return lines


def markdown(
    rows: Sequence[Row],
    info: Mapping[str, Any],
    comparison: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any] | None,
) -> str:
    header = (
        f"Measured {info['date']} on {info['cpu']} ({info['threads']} threads, torch {info['torch']}, "
        f"project precision {info['precision']}); {info['rounds']} alternating rounds per row after a warm-up "
        f"round; load average {info['load_before']} before, {info['load_after']} after; whole run "
        f"{info['seconds']:.0f} s{' (--quick)' if info['quick'] else ''}."
    )
    notes = [f"- {r.figure}: {r.note}" for r in rows if r.note]
    extra: list[str] = []
    profile = info.get("profile")
    if isinstance(profile, dict):
        shares = ", ".join(f"{k} {v:.0f}%" for k, v in profile.items() if k not in ("convolution_gflops",))
        extra = [
            "",
            f"Self CPU time of one {info['precision']} Pretrainer.step of the flops row (torch.profiler): {shares}; "
            f"inside the convolution kernels alone {profile['convolution_gflops']:.0f} GFLOP/s.",
        ]
    dropped = [f"- {d}" for d in info.get("dropped", [])]
    if dropped:
        extra += ["", "Rows dropped to keep the run within its time budget (`--budget-s`):", *dropped]
    parts = [
        header,
        "",
        *table(rows),
        "",
        "Notes:",
        *notes,
        *extra,
        "",
        *comparison_lines(comparison, previous),
    ]
    return "\n".join(parts) + "\n"

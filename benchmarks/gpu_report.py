"""gpu_check.md: a status table of the sections, a headline per section, then every figure it measured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def num(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def flat(value: Any, indent: int = 0) -> list[str]:
    """A nested dict as a bulleted list (lists of numbers on one line)."""
    pad = "  " * indent
    if not isinstance(value, Mapping):
        return [f"{pad}- {show(value)}"]
    out = []
    for key, v in value.items():
        if isinstance(v, Mapping):
            out += [f"{pad}- {key}:", *flat(v, indent + 1)]
        else:
            out.append(f"{pad}- {key}: {show(v)}")
    return out


def show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float | int):
        return num(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def spread(s: Mapping[str, float] | None) -> str:
    return "—" if not s else f"{s['median']:.2f}x [{s['min']:.2f}–{s['max']:.2f}]"


def headline(name: str, r: Mapping[str, Any]) -> str:
    """One sentence with the section's main figures (empty where there is none)."""
    if name == "device":
        peaks = ", ".join(f"{k} {v / 1000:.1f} TFLOP/s" for k, v in r["peak_gflops"].items())
        return f"{r['device']}, torch {r['torch']}, CUDA {r['cuda']}; measured matmul peaks: {peaks}."
    if name == "pretrain":
        parts = [
            f"{k} {num(v['images_per_s'])} images/s"
            + (f" ({v['percent_of_peak']:.0f} % of {v['peak']} peak)" if "percent_of_peak" in v else "")
            for k, v in r.items()
            if isinstance(v, Mapping) and v.get("status") == "measured"
        ]
        return f"{r['net']}, batch {r['batch']}, {r['data']}: " + "; ".join(parts) + "."
    if name == "meta_train":
        parts = [
            f"{k}: project {num(v['project_tasks_per_s'])} tasks/s vs reference {num(v['reference_tasks_per_s'])}, "
            f"speed-up {spread(v['speedup'])}"
            for k, v in r.items()
            if isinstance(v, Mapping) and v.get("status") == "measured"
        ]
        return "; ".join(parts) + "."
    if name == "meta_test":
        parts = [
            f"{k.replace('_', ' ')}: {num(v['project_episodes_per_s'])} episodes/s (reference {num(v['reference_episodes_per_s'])}, speed-up {spread(v['speedup'])})"
            for k, v in r.items()
            if k.endswith("_episodes")
        ]
        return f"{r['data']}; " + "; ".join(parts) + "."
    if name == "projection":
        return f"`mtl run --config {r['config']}`: about {r['total_hours']:.1f} h on this device."
    return ""


def markdown(payload: Mapping[str, Any]) -> str:
    smoke = payload["mode"] == "cpu-smoke"
    lines = [
        f"# GPU check: {payload['device']}, {payload['date']}",
        "",
        f"Mode: {payload['mode']}"
        + (" (toy sizes on the CPU: the figures check the code and mean nothing)" if smoke else "")
        + f"; whole run {payload['seconds']:.0f} s of a {payload['budget_s']:.0f}-s budget.",
        "",
        "| section | status | seconds | reason or error |",
        "|---|---|---:|---|",
    ]
    sections = payload["sections"]
    for name, s in sections.items():
        why = s.get("reason") or s.get("error") or ""
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {why[:200]} |")
    for name, s in sections.items():
        lines += ["", f"## {name}: {s['status']}", ""]
        results = s.get("results")
        if not results:
            lines.append(s.get("reason") or s.get("error") or "")
            continue
        try:
            text = headline(name, results)
        except (KeyError, TypeError):  # a part failed; the figures below say which
            text = ""
        lines += ([text, ""] if text else []) + flat(results)
    return "\n".join(lines) + "\n"

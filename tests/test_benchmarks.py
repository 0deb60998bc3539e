"""The benchmark scripts: rounds and their spread, the run-to-run comparison, and the GPU check's CPU
smoke, which runs every section of benchmarks/gpu_check.py at toy sizes so it cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import run  # noqa: E402
from gpu_sections import Skip  # noqa: E402
from report import compare  # noqa: E402
from timing import Row, Spread, alternate  # noqa: E402


def test_alternate_calls_reference_then_project_and_keeps_the_warm_up_apart() -> None:
    calls: list[str] = []

    def path(name: str, scale: int) -> Callable[[int], int]:
        def round_(k: int) -> int:
            calls.append(f"{name}{k}")
            return scale * k

        return round_

    rounds = alternate(path("r", 1), path("p", 10), 3)
    assert calls == ["r0", "p0", "r1", "p1", "r2", "p2", "r3", "p3"]
    assert rounds.warm_up == (0, 0)
    assert rounds.reference == [1, 2, 3] and rounds.project == [10, 20, 30]


def test_speedup_is_the_median_of_paired_round_ratios_with_its_range() -> None:
    row = Row("s", "f", "tasks/s", reference=(1.0, 2.0, 1.0, 4.0, 1.0), project=(3.0, 4.0, 2.5, 4.0, 2.0))
    assert row.speedups == [3.0, 2.0, 2.5, 1.0, 2.0]
    assert row.speedup == Spread(2.0, 1.0, 3.0)
    assert row.speedup.text("x") == "2.0x [1.0–3.0]"
    assert Row("s", "f", "%", (1.0,), (2.0,), ratio=False).speedup is None


def test_compare_flags_a_speedup_that_moved_more_than_15_percent() -> None:
    rows = [
        Row("m", "a", "x", (1.0,), (2.0,)),
        Row("m", "b", "x", (1.0,), (3.0,)),
        Row("m", "c", "x", (1.0,), (1.0,)),
    ]
    before = {
        "rows": [{"figure": "a", "speedup": {"median": 1.8}}, {"figure": "b", "speedup": {"median": 2.0}}]
    }
    got = {c["figure"]: c for c in compare(rows, before)}
    assert set(got) == {"a", "b"}  # c has no earlier figure
    assert got["a"]["steady"] and got["a"]["apart"] == pytest.approx(0.2 / 1.8)
    assert not got["b"]["steady"] and got["b"]["apart"] == pytest.approx(0.5)
    assert compare(rows, None) == []
    older = {"rows": [{"figure": "a", "speedup": 2.5}]}  # bench.json before rounds: a plain number
    assert compare(rows, older)[0]["previous"] == 2.5


def test_rows_that_would_overrun_the_budget_are_dropped_whole() -> None:
    ran: list[str] = []

    def job(key: str) -> run.Job:
        def go() -> tuple[list[Row], dict[str, Any]]:
            ran.append(key)
            return [Row("m", key, "x", (1.0,), (2.0,))], {}

        return run.Job("meta-train", key, go)

    rows, info = run.run_jobs([job("a"), job("b"), job("c")], 100.0, {"a": 50.0, "b": 500.0})
    assert ran == ["a", "c"]  # b took 500 s last time, more than is left; c's cost is unknown
    assert [r.figure for r in rows] == ["a", "c"]
    assert len(info["dropped"]) == 1 and info["dropped"][0].startswith("b (")
    assert set(info["job_seconds"]) == {"a", "c"}
    _, info = run.run_jobs([job("d")], 0.0, {})
    assert info["dropped"] and not info["job_seconds"]  # nothing starts once the budget is spent


def test_a_failing_section_is_reported_and_the_next_one_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(check: Any) -> dict[str, Any]:
        raise ValueError("no such kernel")

    def skipping(check: Any) -> dict[str, Any]:
        raise Skip("not here")

    def fine(check: Any) -> dict[str, Any]:
        return {"a": {"status": "measured", "x": 1.0}, "b": {"status": "failed", "error": "bad b"}, "c": 2}

    def good(check: Any) -> dict[str, Any]:
        return {"x": 1.5}

    sections = {"one": (broken, 0), "two": (skipping, 0), "three": (fine, 0), "four": (good, 0)}
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    check = gpu_check.Check(gpu_check.Target("cpu"), gpu_check.SMOKE, tmp_path, None)
    payload = gpu_check.run_check(check, 60, True, list(sections))
    s = payload["sections"]
    assert s["one"]["status"] == "failed" and "ValueError: no such kernel" in s["one"]["error"]
    assert s["two"] == {"status": "skipped", "reason": "not here", "seconds": s["two"]["seconds"]}
    assert s["three"]["status"] == "failed" and s["three"]["error"] == "b: bad b"
    assert s["four"]["status"] == "measured" and s["four"]["results"] == {"x": 1.5}
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [v["status"] for v in written["sections"].values()] == ["failed", "skipped", "failed", "measured"]
    assert "| one | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_cpu_smoke_measures_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = payload["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, section in sections.items():
        assert section["status"] == "measured", (name, section.get("reason") or section.get("error"))
    pre = sections["pretrain"]["results"]
    assert pre["fp32"]["images_per_s"] > 0 and pre["bf16_channels_last"]["images_per_s"] > 0
    assert pre["bf16_channels_last_compile"]["status"] == "skipped"
    assert "cpu-smoke" in pre["bf16_channels_last_compile"]["reason"]
    for shot in ("1shot", "5shot"):
        assert sections["meta_train"]["results"][shot]["speedup"]["min"] > 0
    for count in gpu_check.SMOKE.meta_test.episodes:
        assert sections["meta_test"]["results"][f"{count}_episodes"]["project_episodes_per_s"] > 0
    dist = sections["distributed"]["results"]
    assert dist["backend"] == "gloo" and dist["ranks"] == 2
    assert all(dist[phase]["status"] == "measured" for phase in ("pretrain", "meta_train", "meta_test"))
    numerics = sections["numerics"]["results"]
    for phase in ("pretrain", "meta_train"):
        assert numerics[f"{phase}_fp16"]["scaler_enabled"] and not numerics[f"{phase}_bf16"]["scaler_enabled"]
        assert numerics[f"{phase}_bf16"]["first_step_gap"] <= 0.01
    assert len(numerics["pretrain_bf16"]["losses"]) == gpu_check.SMOKE.numerics_steps
    assert sections["projection"]["results"]["total_hours"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: measured" in text for name in gpu_check.SECTIONS)
    assert "cpu-smoke" in text

"""The benchmark suite's report: goal lines and the kept "Backlog drain" section."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.__main__ as suite
from bench.common import Goal, Section, alternate


def test_goal_line_at_least_met() -> None:
    assert Goal("ingest", 0.724, 0.6).line() == "ingest: 0.72 (goal >= 0.6) met"


def test_goal_line_at_most_not_met() -> None:
    goal = Goal("poll CPU", 2.5, 2.0, at_least=False)
    assert goal.line() == "poll CPU: 2.50 (goal <= 2) not met"


def test_goal_line_not_measured() -> None:
    goal = Goal("chart", None, 0.0, reason="no route reads the rollups yet")
    assert goal.line() == "chart: not measured (no route reads the rollups yet) not met"


def test_alternate_interleaves_measures() -> None:
    calls: list[str] = []

    def measure(name: str):
        def run(index: int) -> float:
            calls.append(f"{name}{index}")
            return float(index)
        return run

    results = alternate(2, measure("a"), measure("b"))
    assert calls == ["a0", "b0", "a1", "b1"]
    assert results == [[0.0, 1.0], [0.0, 1.0]]


def test_write_keeps_drain_section(tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nold text\n\n## Collector ingest\n\nold\n\n"
                    "## Backlog drain\n\ndrained 5 s\n\n## Goals\n\nold goals\n")
    monkeypatch.setattr(suite, "BENCHMARKS", path)
    section = Section("Agent buffer", ["new figures"], [Goal("buffer", 0.7, 0.5)])
    text = suite.render([section], 60.0)

    suite.write(text)

    written = path.read_text()
    assert "## Backlog drain\n\ndrained 5 s\n\n## Goals" in written
    assert "## Agent buffer\n\nnew figures\n" in written
    assert "old text" not in written
    assert written.rstrip().endswith("buffer: 0.70 (goal >= 0.5) met\n```")

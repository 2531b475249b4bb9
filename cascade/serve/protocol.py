"""The wire formats: OpenAI chat completions, Anthropic messages, models, errors, feedback.

One module holds every request and response shape (as vLLM's ``protocol.py`` does), so what
the service accepts and returns can be read in one place. Requests allow unknown fields only so
that :meth:`ChatCompletionRequest.unsupported` can name them in a 400: a field the cascade
cannot honour is refused, never silently dropped.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AnthropicText",
    "AnthropicUsage",
    "CascadeTrace",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "Choice",
    "ChunkChoice",
    "Delta",
    "ErrorBody",
    "ErrorResponse",
    "FeedbackRequest",
    "FeedbackResponse",
    "JsonSchemaFormat",
    "MessagesRequest",
    "MessagesResponse",
    "ModelCard",
    "ModelList",
    "ResponseFormat",
    "ResponseMessage",
    "StreamOptions",
    "Usage",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


_REQUEST = ConfigDict(extra="allow", strict=True)
"""Unknown fields are kept only to be named in a 400; types are strict, as OpenAI's and
Anthropic's APIs are: ``"max_tokens": true`` is not a cap of 1, nor ``"stream": "yes"`` true."""


# ---------------------------------------------------------------- requests


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with ``usage`` (summed over every call of the request)."""
    include_obfuscation: bool | None = None
    """Accepted and ignored: OpenAI pads its deltas against a token-length side channel; the
    service sends the whole verified answer in one delta, so there is nothing to pad."""


class JsonSchemaFormat(_Strict):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. ``model`` names the ladder, not a model."""

    model_config = _REQUEST

    model: str
    messages: list[dict[str, Any]]
    stream: bool | None = False
    """null (the SDK's ``stream=None``) is false, as in OpenAI's API."""
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    """Caps every rung's ``max_tokens``."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The newer name of ``max_tokens``; the lower of the two wins."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Replaces every rung's temperature."""
    stop: str | list[str] | None = None
    n: int | None = 1
    """Must be 1; null (the SDK's ``n=None``) is 1, as in OpenAI's API."""
    user: str | None = None
    """Travels into the answer's metadata (and the audit log)."""
    metadata: dict[str, str] | None = None
    response_format: ResponseFormat | None = None
    """A JSON schema here adds the schema verifier; ``json_object`` requires a JSON object."""

    def unsupported(self) -> list[str]:
        """Fields sent that the service does not implement, in the order sent."""
        return list(self.model_extra or {})

    def token_cap(self) -> int | None:
        caps = [c for c in (self.max_tokens, self.max_completion_tokens) if c is not None]
        return min(caps) if caps else None

    def output_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return {"type": "object"}
        if rf.json_schema is None:
            return None
        return rf.json_schema.schema_

    def schema_options(self) -> dict[str, Any]:
        """The json_schema's ``name``, ``description`` and ``strict`` that the client sent:
        the rungs send them on (``strict`` constrains an OpenAI rung's decoding)."""
        rf = self.response_format
        if rf is None or rf.json_schema is None:
            return {}
        js = rf.json_schema
        return {k: getattr(js, k) for k in ("name", "description", "strict")
                if k in js.model_fields_set and getattr(js, k) is not None}


class MessagesRequest(BaseModel):
    """``POST /v1/messages``, Anthropic's wire format. ``model`` names the ladder."""

    model_config = _REQUEST

    model: str
    max_tokens: int = Field(ge=1)
    """Caps every rung's ``max_tokens`` (required, as in Anthropic's API)."""
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    """Only ``user_id`` (it travels into the answer's metadata as ``user``)."""
    cache_control: dict[str, Any] | None = None
    """Accepted and ignored, as on a block: a provider-side caching hint (the SDK's automatic
    prompt caching); the cascade has its own cache."""

    def unsupported(self) -> list[str]:
        return list(self.model_extra or {})


class FeedbackRequest(_Strict):
    """``POST /v1/feedback``: a user's judgement of an answer, by its request id."""

    request_id: str = Field(min_length=1, max_length=200)
    correct: bool
    expected: str | None = None
    """The right answer, when the user knows it."""


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CascadeTrace(BaseModel):
    """Our extension of the response: what the climb did for this answer."""

    request_id: str
    ladder: str
    verified: bool
    cache_hit: bool
    cost_usd: float
    latency_ms: float
    attempts: list[dict[str, Any]]
    """Every rung tried, with status, tokens, cost, latency and verdicts (not the texts)."""
    warnings: list[str] = Field(default_factory=list)
    route: dict[str, Any] | None = None
    """The router's decision (start, skipped, scores, reason) when the ladder has one."""


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    """The model of the rung whose answer this is."""
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    cascade: CascadeTrace


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    cascade: CascadeTrace | None = None
    """Only on the first chunk (the one that carries the answer)."""


class AnthropicText(BaseModel):
    type: Literal["text"] = "text"
    text: str


class AnthropicUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    """The model of the rung whose answer this is."""
    content: list[AnthropicText]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: AnthropicUsage
    cascade: CascadeTrace


class ModelCard(BaseModel):
    """One ladder, in both SDKs' model shapes: OpenAI's (``object``, ``created``,
    ``owned_by``) and Anthropic's (``type``, ``display_name``, ``created_at``, ``lifecycle``,
    which its ``ModelInfo`` requires)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cascade"
    type: Literal["model"] = "model"
    display_name: str = ""
    created_at: str = "1970-01-01T00:00:00Z"
    """RFC 3339, as Anthropic's API sends it (``created``'s instant)."""
    lifecycle: Literal["active"] = "active"
    rungs: list[str] = Field(default_factory=list)
    """Our extension: the ladder's rungs, cheapest first."""


class ModelList(BaseModel):
    """OpenAI's list, with Anthropic's page fields (one page: ``has_more`` is false)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    cascade: CascadeTrace | None = None
    """The trace, when the climb ran (no answer, unverified under policy "raise")."""


class ErrorResponse(BaseModel):
    error: ErrorBody


class FeedbackResponse(BaseModel):
    request_id: str
    recorded: bool = True

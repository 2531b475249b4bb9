"""The provider boundary: one abstract async method, SDK errors translated here and nowhere else."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cascade.config import RungConfig
from cascade.messages import Message

__all__ = ["Completion", "ModelCall", "Provider", "TokenLogprob", "rung_call",
           "schema_instruction"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of one generated token, with the top alternatives where returned."""

    token: str
    logprob: float
    top: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelCall:
    """Everything one model call needs, independent of the SDK that makes it."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int = 512
    temperature: float = 0.0
    timeout_s: float = 60.0
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: Mapping[str, Any] | None = None
    """Ask for JSON output matching this schema, where the provider supports it."""
    schema_options: Mapping[str, Any] = field(default_factory=dict)
    """The schema's ``name``, ``description`` and ``strict``, where the mode has a place."""
    output_type: type[Any] | None = None
    """A pydantic model: the provider asks for structured output through ``instructor``."""
    reasks: int = 0
    """instructor's own re-ask budget; 0 by default because escalating is the cascade's job."""
    stop: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Provider-specific request fields passed through unchanged (``extra_body``)."""


def rung_call(rung: RungConfig, messages: Sequence[Message], *,
              json_schema: Mapping[str, Any] | None = None,
              output_type: type[Any] | None = None,
              schema_options: Mapping[str, Any] | None = None) -> ModelCall:
    """The call a rung makes for a request: built in one place, so what the engine sends, what
    ``cascade record`` stores and what a replay looks up are the same call."""
    return ModelCall(
        model=rung.model, messages=tuple(messages), max_tokens=rung.max_tokens,
        temperature=rung.temperature, timeout_s=rung.timeout_s, logprobs=rung.logprobs,
        top_logprobs=5 if rung.logprobs else 0, json_schema=json_schema,
        schema_options=dict(schema_options or {}) if json_schema is not None else {},
        output_type=output_type, stop=rung.stop, extra=dict(rung.extra),
    )


def schema_instruction(schema: Mapping[str, Any]) -> str:
    """The system text that asks for JSON when the schema cannot be sent as a request field
    (and what the cost estimate counts for a schema sent either way)."""
    return ("Answer with a single JSON value and nothing else. It must match this JSON "
            "Schema:\n" + json.dumps(dict(schema), ensure_ascii=False))


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A model's reply, reduced to what the cascade needs. Usage comes from the response."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None = None
    """Normalised: ``stop``, ``length``, ``content_filter``, ``tool_calls`` or None."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    parsed: Any = None
    """The validated ``output_type`` instance, when structured output was asked for and valid."""
    parse_error: str | None = None
    """Why structured output did not validate (the candidate is still returned, unparsed)."""
    latency_ms: float = 0.0
    provider_request_id: str | None = None
    stop_sequence: str | None = None
    """Which stop sequence ended the answer, when the server says (Anthropic's
    ``stop_sequence``; vLLM's ``stop_reason``); None when it ended otherwise or did not say."""


class Provider(ABC):
    """Makes model calls for one endpoint (provider kind + base URL + credentials).

    Implementations translate every SDK or transport failure into a
    :class:`cascade.errors.ProviderError` subclass, so nothing above this layer knows an SDK.
    """

    name: str = "provider"

    @abstractmethod
    async def complete(self, call: ModelCall) -> Completion:
        """Make one call (no retries: the engine owns retry policy) and return the reply."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Called when the owning Cascade is closed."""

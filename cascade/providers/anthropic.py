"""Anthropic messages API. System turns go to ``system=``; Anthropic returns no logprobs.

As with OpenAI, the SDK's retries are off and replies are checked against the protocol here.
Structured output goes through instructor's Anthropic tools mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anthropic
import httpx2

from cascade.config import RungConfig
from cascade.errors import ConfigError, MalformedReply
from cascade.providers._common import Where, attr, count, normalise_finish, vendor_url
from cascade.providers._sdk import SDKProvider, Wire, schema_name
from cascade.providers.base import Completion, ModelCall, schema_instruction
from cascade.settings import STRUCTURED_BY_KIND, VENDOR_KEY_ENVS

__all__ = ["AnthropicProvider"]


_MODES = STRUCTURED_BY_KIND["anthropic"]
_VENDOR_URL = "https://api.anthropic.com"


def _request(call: ModelCall, *, schema: Mapping[str, Any] | None, mode: str) -> dict[str, Any]:
    # No temperature: the messages API of this SDK generation no longer takes one (a rung
    # that needs it can pass it through ``extra``).
    system = [m.content for m in call.messages if m.role == "system"]
    if schema is not None and mode == "prompt":
        system.insert(0, schema_instruction(schema))
    kwargs: dict[str, Any] = {
        "model": call.model,
        "messages": [m.to_dict() for m in call.messages if m.role != "system"],
        "max_tokens": call.max_tokens,
        "timeout": call.timeout_s,
    }
    if schema is not None and mode == "json_schema":
        kwargs["output_config"] = {"format": {"type": "json_schema", "schema": dict(schema)}}
    elif schema is not None and mode == "tools":
        name = call.schema_options.get("name") or schema_name(schema)
        kwargs["tools"] = [{"name": name, "description": call.schema_options.get(
            "description", "Give the answer."), "input_schema": dict(schema)}]
        kwargs["tool_choice"] = {"type": "tool", "name": name}
    if system:
        kwargs["system"] = "\n\n".join(system)
    if call.stop:
        kwargs["stop_sequences"] = list(call.stop)
    if call.extra:
        kwargs["extra_body"] = dict(call.extra)
    return kwargs


def _input_tokens(usage: object) -> int | None:
    """All the input the reply was billed for: with prompt caching, ``input_tokens`` leaves
    out the part read from or written to the cache (billed at 0.1x and 1.25x). Counted at the
    full rate, the cost is within 20% on a write and above it on a read, never 10x below."""
    i = count(attr(usage, "input_tokens"))
    cached = [attr(usage, k) for k in ("cache_creation_input_tokens", "cache_read_input_tokens")]
    if i is None or any(c is not None and count(c) is None for c in cached):
        return None
    return count(i + sum(c for c in cached if isinstance(c, int)))


def _usage(total: object) -> tuple[int, int] | None:
    i, o = _input_tokens(total), count(attr(total, "output_tokens"))
    return (i, o) if i is not None and o is not None and (i, o) != (0, 0) else None


def _bad(what: str, where: Where) -> MalformedReply:
    return MalformedReply(f"not a valid messages reply: {what}", **where)


def _read(reply: object, where: Where) -> tuple[str, int, int]:
    """Check the reply against the protocol; return (text, input tokens, output tokens)."""
    if isinstance(reply, str):
        raise _bad("the body is not JSON (wrong content type)", where)
    content = attr(reply, "content")
    if not isinstance(content, list):
        raise _bad(f"'content' is {type(content).__name__}, expected a list of blocks", where)
    texts: list[str] = []
    tool_input: object = None
    for block in content:
        kind = attr(block, "type")
        if kind == "text":
            text = attr(block, "text")
            if not isinstance(text, str):
                raise _bad(f"a text block's 'text' is {type(text).__name__}", where)
            texts.append(text)
        elif kind == "tool_use" and tool_input is None:
            tool_input = attr(block, "input")
        elif not isinstance(kind, str):
            raise _bad("a content block has no 'type'", where)
    if not texts and isinstance(tool_input, dict):
        texts.append(json.dumps(tool_input))  # instructor's tools mode answers in a tool call
    usage = attr(reply, "usage")
    i, o = _input_tokens(usage), count(attr(usage, "output_tokens"))
    if i is None or o is None:
        raise _bad("usage.input_tokens/output_tokens must be integers in [0, 1e9]", where)
    return "".join(texts), i, o


def _completion(reply: object, call: ModelCall, where: Where, start: float, *,
                parsed: Any = None, parse_error: str | None = None) -> Completion:
    text, input_tokens, output_tokens = _read(reply, where)
    model = attr(reply, "model")
    request_id = getattr(reply, "_request_id", None)
    stopped = attr(reply, "stop_sequence") if attr(reply, "stop_reason") == "stop_sequence" \
        else None
    return Completion(
        text=text,
        model=model if isinstance(model, str) and model else call.model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=normalise_finish(attr(reply, "stop_reason")),
        logprobs=None,
        parsed=parsed,
        parse_error=parse_error,
        latency_ms=(time.perf_counter() - start) * 1000.0,
        provider_request_id=request_id if isinstance(request_id, str) else None,
        stop_sequence=stopped if isinstance(stopped, str) and stopped else None,
    )


class AnthropicProvider(SDKProvider[anthropic.AsyncAnthropic]):
    """Kind ``anthropic``; one ``AsyncAnthropic`` client per endpoint."""

    sdk = anthropic
    wire = Wire(check=_read, completion=_completion, usage=_usage)
    instructor_provider = "ANTHROPIC"
    structured_modes = _MODES
    default_structured = "tools"
    lean_path = "/v1/messages"
    request_id_header = "request-id"

    def __init__(self, rung: RungConfig) -> None:
        if rung.structured_output not in (None, *_MODES):
            raise ConfigError(f"is {rung.structured_output!r}, which the messages API cannot "
                              f"send; allowed for anthropic: {', '.join(_MODES)}",
                              key="structured_output")
        super().__init__(rung)

    def _key_source(self) -> tuple[str | None, str | None]:
        # Anthropic's key goes to Anthropic; another host's variable must be named.
        return (VENDOR_KEY_ENVS["anthropic"] if vendor_url(self.rung.base_url, _VENDOR_URL)
                else None), None

    def _new_client(self, key: str, http_client: httpx2.AsyncClient
                    ) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(api_key=key, base_url=self.rung.base_url,
                                        max_retries=0, timeout=self.rung.timeout_s,
                                        http_client=http_client)

    def _endpoint(self, client: anthropic.AsyncAnthropic) -> Callable[..., Awaitable[Any]]:
        return client.messages.create

    def _request(self, call: ModelCall, *, schema: Mapping[str, Any] | None,
                 mode: str) -> dict[str, Any]:
        return _request(call, schema=schema, mode=mode)

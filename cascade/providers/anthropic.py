"""Anthropic messages API. System turns go to ``system=``; Anthropic returns no logprobs.

As with OpenAI, the SDK's retries are off and replies are checked against the protocol here.
Structured output goes through instructor's Anthropic tools mode.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import anthropic

from cascade.config import RungConfig
from cascade.errors import MalformedReply
from cascade.providers._common import (
    Where,
    attr,
    count,
    guarded,
    normalise_finish,
    resolve_api_key,
    run_instructor,
)
from cascade.providers.base import Completion, ModelCall, Provider

__all__ = ["AnthropicProvider"]


class AnthropicProvider(Provider):
    """Kind ``anthropic``; one ``AsyncAnthropic`` client per endpoint."""

    def __init__(self, rung: RungConfig) -> None:
        self.rung = rung
        self.name = rung.provider
        self._client: anthropic.AsyncAnthropic | None = None
        self._key: str | None = None

    def _get_client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            self._key = resolve_api_key(self.rung, default_env="ANTHROPIC_API_KEY", dummy=None)
            self._client = anthropic.AsyncAnthropic(
                api_key=self._key,
                base_url=self.rung.base_url,
                max_retries=0,
                timeout=self.rung.timeout_s,
            )
        return self._client

    async def complete(self, call: ModelCall) -> Completion:
        client = self._get_client()
        where = Where(provider=self.name, model=call.model)
        kwargs = _request(call)

        create = guarded(client.messages.create, anthropic, secret=self._key, where=where,
                         check=_read)

        start = time.perf_counter()
        if call.output_type is None:
            return _completion(await create(**kwargs), call, where, start)
        import instructor

        result = await run_instructor(
            create, mode=instructor.Mode.TOOLS, provider=instructor.Provider.ANTHROPIC,
            output_type=call.output_type, reasks=call.reasks, kwargs=kwargs, where=where,
        )
        done = _completion(result.raw, call, where, start, parsed=result.parsed,
                           parse_error=result.error)
        total = result.total_usage
        i, o = count(attr(total, "input_tokens")), count(attr(total, "output_tokens"))
        if i is not None and o is not None and (i, o) != (0, 0):
            done = replace(done, input_tokens=i, output_tokens=o)
        return done

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def _request(call: ModelCall) -> dict[str, Any]:
    # No temperature: the messages API of this SDK generation no longer takes one (a rung
    # that needs it can pass it through ``extra``).
    system = [m.content for m in call.messages if m.role == "system"]
    kwargs: dict[str, Any] = {
        "model": call.model,
        "messages": [m.to_dict() for m in call.messages if m.role != "system"],
        "max_tokens": call.max_tokens,
        "timeout": call.timeout_s,
    }
    if call.json_schema is not None and call.output_type is None:
        kwargs["output_config"] = {
            "format": {"type": "json_schema", "schema": dict(call.json_schema)}
        }
    if system:
        kwargs["system"] = "\n\n".join(system)
    if call.stop:
        kwargs["stop_sequences"] = list(call.stop)
    if call.extra:
        kwargs["extra_body"] = dict(call.extra)
    return kwargs


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
    i, o = count(attr(usage, "input_tokens")), count(attr(usage, "output_tokens"))
    if i is None or o is None:
        raise _bad("usage.input_tokens/output_tokens must be non-negative integers", where)
    return "".join(texts), i, o


def _completion(reply: object, call: ModelCall, where: Where, start: float, *,
                parsed: Any = None, parse_error: str | None = None) -> Completion:
    text, input_tokens, output_tokens = _read(reply, where)
    model = attr(reply, "model")
    request_id = getattr(reply, "_request_id", None)
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
    )

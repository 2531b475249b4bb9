"""OpenAI chat completions, for api.openai.com and any OpenAI-compatible server (``base_url``).

The SDK's own retries are off (``max_retries=0``): the engine owns retry policy, so a retry is
counted once. Replies are checked against the wire protocol here, because the SDK builds its
objects without validation and a broken server would otherwise surface as an AttributeError
far from the cause.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any

import openai

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
from cascade.providers.base import Completion, ModelCall, Provider, TokenLogprob

__all__ = ["OpenAIProvider"]

_DUMMY_KEY = "sk-no-key-required"


class OpenAIProvider(Provider):
    """Kinds ``openai`` and ``openai-compatible``; one ``AsyncOpenAI`` client per endpoint."""

    def __init__(self, rung: RungConfig) -> None:
        self.rung = rung
        self.name = rung.provider
        self._client: openai.AsyncOpenAI | None = None
        self._key: str | None = None

    def _get_client(self) -> openai.AsyncOpenAI:
        # Built on first use so that a missing key fails the call (the cascade records it and
        # moves on) rather than the construction of the whole ladder.
        if self._client is None:
            compatible = self.rung.provider == "openai-compatible"
            self._key = resolve_api_key(
                self.rung,
                default_env=None if compatible else "OPENAI_API_KEY",
                dummy=_DUMMY_KEY if compatible else None,
            )
            self._client = openai.AsyncOpenAI(
                api_key=self._key,
                base_url=self.rung.base_url,
                max_retries=0,
                timeout=self.rung.timeout_s,
            )
        return self._client

    def _where(self, call: ModelCall) -> Where:
        return {"provider": self.name, "model": call.model}

    async def complete(self, call: ModelCall) -> Completion:
        client = self._get_client()
        where = self._where(call)
        kwargs = _request(call, official=self.rung.provider == "openai")

        create = guarded(client.chat.completions.create, openai, secret=self._key,
                         where=where, check=_read)

        start = time.perf_counter()
        if call.output_type is None:
            reply = await create(**kwargs)
            return _completion(reply, call, where, start)
        kwargs.pop("response_format", None)
        import instructor

        mode = (instructor.Mode.JSON if self.rung.provider == "openai-compatible"
                else instructor.Mode.TOOLS)
        result = await run_instructor(
            create, mode=mode, provider=instructor.Provider.OPENAI,
            output_type=call.output_type, reasks=call.reasks, kwargs=kwargs, where=where,
        )
        done = _completion(result.raw, call, where, start, parsed=result.parsed,
                           parse_error=result.error)
        usage = _usage(result.total_usage)
        if usage is not None:
            done = _with_usage(done, usage)
        return done

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


_REASONING = re.compile(r"^(o\d+(-|$)|gpt-5(?!-chat))")
"""OpenAI models that take only the default temperature (o1, o3, o4-mini, gpt-5 ...)."""


def _request(call: ModelCall, *, official: bool) -> dict[str, Any]:
    """The request body. OpenAI's own API takes ``max_completion_tokens`` (its reasoning models
    refuse ``max_tokens``, and they refuse any but the default temperature); compatible servers
    (vLLM, Ollama, llama.cpp, LM Studio) all know ``max_tokens``."""
    kwargs: dict[str, Any] = {
        "model": call.model,
        "messages": [m.to_dict() for m in call.messages],
        "max_completion_tokens" if official else "max_tokens": call.max_tokens,
        "timeout": call.timeout_s,
    }
    if not (official and _REASONING.match(call.model)):
        kwargs["temperature"] = call.temperature
    if call.stop:
        kwargs["stop"] = list(call.stop)
    if call.logprobs:
        kwargs["logprobs"] = True
        if call.top_logprobs:
            kwargs["top_logprobs"] = call.top_logprobs
    if call.json_schema is not None:
        title = call.json_schema.get("title")
        name = re.sub(r"[^A-Za-z0-9_-]", "_", title if isinstance(title, str) else "") or "answer"
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": name[:64], "schema": dict(call.json_schema)},
        }
    if call.extra:
        kwargs["extra_body"] = dict(call.extra)
    return kwargs


def _bad(what: str, where: Where) -> MalformedReply:
    return MalformedReply(f"not a valid chat.completion reply: {what}", **where)


def _read(reply: object, where: Where) -> tuple[str, Any, Any]:
    """Check the reply against the protocol; return (text, first choice, usage)."""
    if isinstance(reply, str):
        raise _bad("the body is not JSON (wrong content type)", where)
    choices = attr(reply, "choices")
    if not isinstance(choices, list):
        raise _bad(f"'choices' is {type(choices).__name__}, expected a list", where)
    if not choices:
        raise _bad("'choices' is empty", where)
    choice = choices[0]
    message = attr(choice, "message")
    if message is None:
        raise _bad("choices[0] has no 'message'", where)
    content = attr(message, "content")
    if isinstance(content, str):
        text = content
    elif content is None:
        tool_calls = attr(message, "tool_calls")
        args = attr(attr(tool_calls[0], "function"), "arguments") if (
            isinstance(tool_calls, list) and tool_calls) else None
        if isinstance(args, str):
            text = args  # instructor's TOOLS mode: the answer is the tool call's arguments
        elif isinstance(attr(message, "refusal"), str):
            text = ""
        else:
            raise _bad("message.content is null and there is no tool call or refusal", where)
    else:
        raise _bad(f"message.content is {type(content).__name__}, expected a string", where)
    usage = attr(reply, "usage")
    if usage is None:
        raise _bad("'usage' is missing", where)
    if count(attr(usage, "prompt_tokens")) is None or count(
        attr(usage, "completion_tokens")
    ) is None:
        raise _bad("usage.prompt_tokens/completion_tokens must be non-negative integers", where)
    return text, choice, usage


def _logprobs(choice: object, where: Where) -> tuple[TokenLogprob, ...] | None:
    content = attr(attr(choice, "logprobs"), "content")
    if content is None:
        return None
    if not isinstance(content, list):
        raise _bad("logprobs.content is not a list", where)
    out: list[TokenLogprob] = []
    for item in content:
        token, logprob = attr(item, "token"), attr(item, "logprob")
        if not isinstance(token, str) or not isinstance(logprob, (int, float)):
            raise _bad("a logprobs entry lacks a string 'token' or a numeric 'logprob'", where)
        top: dict[str, float] = {}
        for alt in attr(item, "top_logprobs") or ():
            t, lp = attr(alt, "token"), attr(alt, "logprob")
            if isinstance(t, str) and isinstance(lp, (int, float)):
                top[t] = float(lp)
        out.append(TokenLogprob(token=token, logprob=float(logprob), top=top))
    return tuple(out)


def _usage(usage: object) -> tuple[int, int] | None:
    if usage is None:
        return None
    p, c = count(attr(usage, "prompt_tokens")), count(attr(usage, "completion_tokens"))
    return (p, c) if p is not None and c is not None else None


def _with_usage(done: Completion, usage: tuple[int, int]) -> Completion:
    return replace(done, input_tokens=usage[0], output_tokens=usage[1])


def _completion(reply: object, call: ModelCall, where: Where, start: float, *,
                parsed: Any = None, parse_error: str | None = None) -> Completion:
    text, choice, usage = _read(reply, where)
    tokens = _usage(usage)
    assert tokens is not None  # _read checked them
    model = attr(reply, "model")
    request_id = getattr(reply, "_request_id", None)
    return Completion(
        text=text,
        model=model if isinstance(model, str) and model else call.model,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        finish_reason=normalise_finish(attr(choice, "finish_reason")),
        logprobs=_logprobs(choice, where) if call.logprobs else None,
        parsed=parsed,
        parse_error=parse_error,
        latency_ms=(time.perf_counter() - start) * 1000.0,
        provider_request_id=request_id if isinstance(request_id, str) else None,
    )

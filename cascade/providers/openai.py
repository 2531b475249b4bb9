"""OpenAI chat completions, for api.openai.com and any OpenAI-compatible server (``base_url``).

The SDK's own retries are off (``max_retries=0``): the engine owns retry policy, so a retry is
counted once. Replies are checked against the wire protocol here, because the SDK builds its
objects without validation and a broken server would otherwise surface as an AttributeError
far from the cause.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx2
import openai

from cascade.config import RungConfig
from cascade.errors import MalformedReply
from cascade.providers._common import Where, attr, count, normalise_finish, vendor_url
from cascade.providers._sdk import SDKProvider, Wire, schema_name
from cascade.providers.base import Completion, ModelCall, TokenLogprob, schema_instruction
from cascade.settings import STRUCTURED_OUTPUTS, VENDOR_KEY_ENVS

__all__ = ["OpenAIProvider"]

_DUMMY_KEY = "sk-no-key-required"
_VENDOR_URL = "https://api.openai.com/v1"
_MODES = STRUCTURED_OUTPUTS


_REASONING = re.compile(r"^(o\d+(-|$)|gpt-5(?!-chat))")
"""OpenAI models that take only the default temperature (o1, o3, o4-mini, gpt-5 ...)."""


def _request(call: ModelCall, *, official: bool, schema: Mapping[str, Any] | None,
             mode: str) -> dict[str, Any]:
    """The request body. OpenAI's own API takes ``max_completion_tokens`` (its reasoning models
    refuse ``max_tokens``, and they refuse any but the default temperature); compatible servers
    (vLLM, Ollama, llama.cpp, LM Studio) all know ``max_tokens``."""
    messages = [m.to_dict() for m in call.messages]
    if schema is not None and mode in ("json_object", "prompt"):
        messages.insert(0, {"role": "system", "content": schema_instruction(schema)})
    kwargs: dict[str, Any] = {
        "model": call.model,
        "messages": messages,
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
    if schema is not None:
        kwargs.update(_structured(schema, mode, call.schema_options))
    if call.extra:
        kwargs["extra_body"] = dict(call.extra)
    return kwargs


def _structured(schema: Mapping[str, Any], mode: str, options: Mapping[str, Any]
                ) -> dict[str, Any]:
    """The request fields that ask for ``schema`` in ``mode`` (see the README's table), with
    the request's ``name``, ``description`` and ``strict`` where the mode has a place."""
    name = options.get("name") or schema_name(schema)
    told = {k: options[k] for k in ("description", "strict") if k in options}
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": name, **told, "schema": dict(schema)}}}
    if mode == "json_object_schema":  # llama-cpp-python: the schema becomes a grammar
        return {"response_format": {"type": "json_object", "schema": dict(schema)}}
    if mode == "json_object":
        return {"response_format": {"type": "json_object"}}
    if mode == "tools":
        return {"tools": [{"type": "function", "function": {"name": name, **told,
                                                            "parameters": dict(schema)}}],
                "tool_choice": {"type": "function", "function": {"name": name}}}
    return {}  # prompt: the schema is in the system message only


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
        raise _bad("usage.prompt_tokens/completion_tokens must be integers in [0, 1e9]", where)
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


def _stops(call: ModelCall) -> tuple[str, ...]:
    """The stop sequences the call was sent with: the rung's (which a served request's own
    join) and any a config puts in ``extra.stop``."""
    more = call.extra.get("stop") or ()
    return (*call.stop, *([more] if isinstance(more, str) else more))


def _completion(reply: object, call: ModelCall, where: Where, start: float, *,
                parsed: Any = None, parse_error: str | None = None) -> Completion:
    text, choice, usage = _read(reply, where)
    tokens = _usage(usage)
    assert tokens is not None  # _read checked them
    model = attr(reply, "model")
    request_id = getattr(reply, "_request_id", None)
    stopped = attr(choice, "stop_reason")  # vLLM: the stop string that matched (or a token id)
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
        stop_sequence=stopped if isinstance(stopped, str) and stopped in _stops(call) else None,
    )


class OpenAIProvider(SDKProvider[openai.AsyncOpenAI]):
    """Kinds ``openai`` and ``openai-compatible``; one ``AsyncOpenAI`` client per endpoint."""

    sdk = openai
    wire = Wire(check=_read, completion=_completion, usage=_usage)
    instructor_provider = "OPENAI"
    structured_modes = _MODES
    default_structured = "json_schema"
    lean_path = "/chat/completions"
    request_id_header = "x-request-id"

    def __init__(self, rung: RungConfig) -> None:
        super().__init__(rung)
        self._official = rung.provider == "openai"

    def _key_source(self) -> tuple[str | None, str | None]:
        if not self._official:
            return None, _DUMMY_KEY
        # OpenAI's key goes to OpenAI: another host (a fallback's, a proxy's) gets a key only
        # when the config names its variable.
        return (VENDOR_KEY_ENVS["openai"] if vendor_url(self.rung.base_url, _VENDOR_URL)
                else None), None

    def _new_client(self, key: str, http_client: httpx2.AsyncClient) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=self.rung.base_url, max_retries=0,
                                  timeout=self.rung.timeout_s, http_client=http_client)

    def _endpoint(self, client: openai.AsyncOpenAI) -> Callable[..., Awaitable[Any]]:
        return client.chat.completions.create

    def _request(self, call: ModelCall, *, schema: Mapping[str, Any] | None,
                 mode: str) -> dict[str, Any]:
        return _request(call, official=self._official, schema=schema, mode=mode)

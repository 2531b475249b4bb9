"""The Anthropic provider drives the real ``anthropic`` SDK against a loopback messages server."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pydantic
import pytest

from cascade.config import RungConfig
from cascade.errors import (
    AuthenticationError,
    ClientRequestError,
    ConfigError,
    MalformedReply,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    ServerError,
    TransportError,
)
from cascade.messages import Message
from cascade.providers import make_provider
from cascade.providers.anthropic import AnthropicProvider
from cascade.providers.base import Completion, ModelCall, Provider
from tests.loopback import (
    LoopbackServer,
    Reply,
    anthropic_error,
    anthropic_message,
    anthropic_reply,
)

pytestmark = pytest.mark.anyio

KEY_ENV = "CASCADE_TEST_ANTHROPIC_KEY"
KEY = "sk-ant-test-SECRET-abcdef0123456789"
MSGS = (Message("system", "Be brief."), Message("user", "Capital of France?"),
        Message("assistant", "Paris."), Message("user", "And of Italy?"))


class City(pydantic.BaseModel):
    name: str
    population: int


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def rung(server: LoopbackServer, **kw: Any) -> RungConfig:
    base: dict[str, Any] = dict(model="claude-test", provider="anthropic",
                                base_url=server.base_url, api_key_env=KEY_ENV)
    base.update(kw)
    return RungConfig(**base)


def call(**kw: Any) -> ModelCall:
    base: dict[str, Any] = dict(model="claude-test", messages=MSGS, max_tokens=100,
                                timeout_s=5.0)
    base.update(kw)
    return ModelCall(**base)


@asynccontextmanager
async def provider(r: RungConfig) -> AsyncIterator[Provider]:
    p = make_provider(r)
    try:
        yield p
    finally:
        await p.aclose()


async def complete(server: LoopbackServer, c: ModelCall | None = None, **kw: Any) -> Completion:
    async with provider(rung(server, **kw)) as p:
        return await p.complete(c or call())


async def fail(server: LoopbackServer, c: ModelCall | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await complete(server, c)
    err = info.value
    assert KEY not in str(err)
    assert (err.provider, err.model) == ("anthropic", "claude-test")
    return err


async def test_sends_request_and_maps_reply(anthropic_server: LoopbackServer) -> None:
    anthropic_server.queue(Reply(
        json=anthropic_message(["Rome", "."], model="claude-test-20250101", input_tokens=40,
                               output_tokens=3),
        headers={"request-id": "req_abc"},
    ))
    done = await complete(anthropic_server, call(stop=("###",), extra={"top_k": 5}))

    assert len(anthropic_server.requests) == 1
    req = anthropic_server.requests[0]
    assert (req.method, req.path) == ("POST", "/v1/messages")
    assert KEY in (req.headers.get("x-api-key", "") + req.headers.get("authorization", ""))
    assert "anthropic-version" in req.headers
    sent = req.json
    assert sent["model"] == "claude-test"
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert sent["max_tokens"] == 100
    assert sent["stop_sequences"] == ["###"]
    assert sent["top_k"] == 5
    assert "temperature" not in sent and "logprobs" not in sent

    assert done.text == "Rome."
    assert (done.input_tokens, done.output_tokens) == (40, 3)
    assert done.model == "claude-test-20250101"
    assert done.finish_reason == "stop"
    assert done.logprobs is None
    assert done.provider_request_id == "req_abc"
    assert isinstance(make_provider(rung(anthropic_server)), AnthropicProvider)


async def test_no_system_turn_sends_no_system(anthropic_server: LoopbackServer) -> None:
    await complete(anthropic_server, call(messages=(Message("user", "hi"),), logprobs=True))
    assert "system" not in anthropic_server.requests[0].json


@pytest.mark.parametrize(("raw", "expected"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", None),
])
async def test_stop_reason_is_normalised(anthropic_server: LoopbackServer, raw: str,
                                         expected: str | None) -> None:
    anthropic_server.queue(anthropic_reply("x", stop_reason=raw))
    assert (await complete(anthropic_server)).finish_reason == expected


async def test_json_schema_goes_to_output_config(anthropic_server: LoopbackServer) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    await complete(anthropic_server, call(json_schema=schema), structured_output="json_schema")
    sent = anthropic_server.requests[0].json
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


async def test_json_schema_by_default_is_a_forced_tool(anthropic_server: LoopbackServer) -> None:
    """Every Claude model takes tools, not every one takes output_config: tools by default."""
    schema = {"title": "Answer", "type": "object", "properties": {"x": {"type": "integer"}}}
    anthropic_server.queue(Reply(json=anthropic_message(content=[
        {"type": "tool_use", "id": "toolu_1", "name": "Answer", "input": {"x": 3}}],
        stop_reason="tool_use")))
    done = await complete(anthropic_server, call(json_schema=schema))
    sent = anthropic_server.requests[0].json
    assert "output_config" not in sent
    assert sent["tools"][0]["input_schema"] == schema
    assert sent["tool_choice"] == {"type": "tool", "name": "Answer"}
    assert json.loads(done.text) == {"x": 3}


async def test_modes_the_messages_api_cannot_send_are_config_errors(
    anthropic_server: LoopbackServer,
) -> None:
    with pytest.raises(ConfigError, match="allowed for anthropic: json_schema, tools, prompt"):
        make_provider(rung(anthropic_server, structured_output="json_object"))


async def test_missing_key_variable(anthropic_server: LoopbackServer,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    err = await fail(anthropic_server)
    assert isinstance(err, AuthenticationError) and KEY_ENV in str(err)
    assert anthropic_server.requests == []


# ---------------------------------------------------------------- structured output


def _tool_reply(payload: dict[str, Any], **kw: Any) -> Reply:
    block = {"type": "tool_use", "id": "toolu_1", "name": "City", "input": payload}
    return Reply(json=anthropic_message(content=[block], stop_reason="tool_use", **kw))


async def test_structured_output_valid(anthropic_server: LoopbackServer) -> None:
    anthropic_server.queue(_tool_reply({"name": "Rome", "population": 2_800_000},
                                       input_tokens=90, output_tokens=20))
    done = await complete(anthropic_server, call(output_type=City))
    assert done.parsed == City(name="Rome", population=2_800_000)
    assert type(done.parsed) is City
    assert json.loads(done.text) == {"name": "Rome", "population": 2_800_000}
    assert (done.input_tokens, done.output_tokens) == (90, 20)
    sent = anthropic_server.requests[0].json
    assert sent["tools"][0]["name"] == "City"
    assert sent["system"] == "Be brief."
    assert len(anthropic_server.requests) == 1


async def test_structured_output_invalid(anthropic_server: LoopbackServer) -> None:
    anthropic_server.queue(_tool_reply({"name": "Rome", "population": "many"},
                                       input_tokens=90, output_tokens=20))
    done = await complete(anthropic_server, call(output_type=City))
    assert done.parsed is None
    assert done.parse_error is not None and "population" in done.parse_error
    assert json.loads(done.text)["population"] == "many"
    assert (done.input_tokens, done.output_tokens) == (90, 20)
    assert len(anthropic_server.requests) == 1


async def test_structured_output_errors_are_translated(
    anthropic_server: LoopbackServer,
) -> None:
    anthropic_server.queue(anthropic_error(529, "Overloaded", type="overloaded_error"))
    err = await fail(anthropic_server, call(output_type=City))
    assert isinstance(err, ServerError) and err.status_code == 529


# ---------------------------------------------------------------- errors


async def test_429_retry_after(anthropic_server: LoopbackServer) -> None:
    anthropic_server.queue(anthropic_error(429, "rate limited", type="rate_limit_error",
                                           headers={"retry-after": "3"}))
    err = await fail(anthropic_server)
    assert isinstance(err, RateLimited) and err.retry_after_s == 3.0
    assert "rate limited" in str(err)
    assert len(anthropic_server.requests) == 1


@pytest.mark.parametrize(("status", "kind"), [
    (500, ServerError), (529, ServerError), (401, AuthenticationError),
    (403, AuthenticationError), (400, ClientRequestError), (404, ClientRequestError),
])
async def test_status_codes(anthropic_server: LoopbackServer, status: int,
                            kind: type[ProviderError]) -> None:
    anthropic_server.queue(anthropic_error(status, f"said {status}"))
    err = await fail(anthropic_server)
    assert type(err) is kind and err.status_code == status
    assert f"said {status}" in str(err)
    assert len(anthropic_server.requests) == 1


async def test_key_echoed_by_the_server_is_scrubbed(anthropic_server: LoopbackServer) -> None:
    anthropic_server.queue(anthropic_error(401, f"invalid x-api-key {KEY}",
                                           type="authentication_error"))
    err = await fail(anthropic_server)
    assert isinstance(err, AuthenticationError) and "invalid x-api-key" in str(err)


@pytest.mark.parametrize(("reply", "needle"), [
    (Reply(body=b'{"content": [', content_type="application/json"), "JSON"),
    (Reply(body=b"plain words", content_type="text/plain"), "content type"),
    (Reply(json={k: v for k, v in anthropic_message().items() if k != "content"}), "content"),
    (Reply(json={**anthropic_message(), "content": "Rome"}), "content"),
    (Reply(json=anthropic_message(content=[{"type": "text", "text": None}])), "text"),
    (Reply(json={k: v for k, v in anthropic_message().items() if k != "usage"}), "usage"),
    (Reply(json={**anthropic_message(), "usage": {"input_tokens": 1}}), "usage"),
])
async def test_malformed_replies(anthropic_server: LoopbackServer, reply: Reply,
                                 needle: str) -> None:
    anthropic_server.queue(reply)
    err = await fail(anthropic_server)
    assert isinstance(err, MalformedReply)
    assert needle in str(err)


async def test_timeout(anthropic_server: LoopbackServer) -> None:
    anthropic_server.queue(anthropic_reply("late", delay_s=2.0))
    t0 = time.perf_counter()
    err = await fail(anthropic_server, call(timeout_s=0.2))
    assert isinstance(err, ProviderTimeout)
    assert time.perf_counter() - t0 < 1.5
    assert len(anthropic_server.requests) == 1


@pytest.mark.parametrize("fault", ["reset", "close", "garbage"])
async def test_connection_faults(anthropic_server: LoopbackServer, fault: Any) -> None:
    anthropic_server.queue(Reply(json=anthropic_message("x" * 500), fault=fault))
    err = await fail(anthropic_server)
    assert type(err) is TransportError
    assert len(anthropic_server.requests) == 1


async def test_server_down(anthropic_server: LoopbackServer) -> None:
    anthropic_server.down()
    assert type(await fail(anthropic_server)) is TransportError

"""The OpenAI provider drives the real ``openai`` SDK against a loopback chat-completions server."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
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
from cascade.providers import known_providers, make_provider, register_provider
from cascade.providers._common import parse_retry_after
from cascade.providers.base import Completion, ModelCall, Provider
from cascade.providers.openai import OpenAIProvider
from tests.loopback import (
    LoopbackServer,
    RecordedRequest,
    Reply,
    free_port,
    openai_chat,
    openai_error,
    openai_reply,
    openai_tool_chat,
)

pytestmark = pytest.mark.anyio

KEY_ENV = "CASCADE_TEST_OPENAI_KEY"
KEY = "sk-test-SECRET-0123456789abcdef"
MSGS = (Message("system", "Be brief."), Message("user", "What is 2+2?"))


class Pet(pydantic.BaseModel):
    name: str
    age: int


PET_SCHEMA = {"title": "Pet", "type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def rung(server: LoopbackServer | None, **kw: Any) -> RungConfig:
    base: dict[str, Any] = dict(model="gpt-test", provider="openai",
                base_url=server.base_url if server else None, api_key_env=KEY_ENV)
    base.update(kw)
    return RungConfig(**base)


def call(**kw: Any) -> ModelCall:
    base: dict[str, Any] = dict(model="gpt-test", messages=MSGS, max_tokens=64, timeout_s=5.0)
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


async def fail(server: LoopbackServer, c: ModelCall | None = None, **kw: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await complete(server, c, **kw)
    err = info.value
    assert KEY not in str(err) and KEY not in repr(err.args)
    assert err.provider == kw.get("provider", "openai")
    assert err.model == "gpt-test"
    return err


# ---------------------------------------------------------------- what is sent, what comes back


async def test_sends_request_and_maps_reply(openai_server: LoopbackServer) -> None:
    openai_server.queue(Reply(json=openai_chat("4", model="gpt-test-2024", prompt_tokens=21,
                                               completion_tokens=2),
                              headers={"x-request-id": "req-42"}))
    c = call(temperature=0.3, stop=("\n\n",))
    done = await complete(openai_server, c)

    assert len(openai_server.requests) == 1
    req = openai_server.requests[0]
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.json["model"] == "gpt-test"
    assert req.json["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 2+2?"}]
    assert req.json["max_completion_tokens"] == 64 and "max_tokens" not in req.json
    assert req.json["temperature"] == 0.3
    assert req.json["stop"] == ["\n\n"]
    assert "logprobs" not in req.json and "response_format" not in req.json
    assert req.headers["x-stainless-retry-count"] == "0"

    assert done.text == "4"
    assert (done.input_tokens, done.output_tokens) == (21, 2)
    assert done.model == "gpt-test-2024"
    assert done.finish_reason == "stop"
    assert done.logprobs is None and done.parsed is None and done.parse_error is None
    assert done.provider_request_id == "req-42"
    assert done.latency_ms > 0


async def test_logprobs_are_requested_and_mapped(openai_server: LoopbackServer) -> None:
    openai_server.queue(Reply(json=openai_chat(
        "Paris", logprobs=[("Par", -0.01, {"Par": -0.01, "Lon": -4.5}), ("is", -0.2, {})]
    )))
    done = await complete(openai_server, call(logprobs=True, top_logprobs=2))

    sent = openai_server.requests[0].json
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert done.logprobs is not None
    assert [(t.token, t.logprob) for t in done.logprobs] == [("Par", -0.01), ("is", -0.2)]
    assert dict(done.logprobs[0].top) == {"Par": -0.01, "Lon": -4.5}


async def test_missing_logprobs_give_none(openai_server: LoopbackServer) -> None:
    done = await complete(openai_server, call(logprobs=True))
    assert done.logprobs is None


async def test_json_schema_and_extra_are_passed_through(openai_server: LoopbackServer) -> None:
    schema = {"title": "My Answer", "type": "object", "properties": {"x": {"type": "integer"}}}
    await complete(openai_server, call(json_schema=schema, extra={"seed": 7, "top_k": 3}))
    sent = openai_server.requests[0].json
    assert sent["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "My_Answer", "schema": schema}
    }
    assert (sent["seed"], sent["top_k"]) == (7, 3)


@pytest.mark.parametrize(("raw", "expected"), [
    ("length", "length"), ("content_filter", "content_filter"), ("tool_calls", "tool_calls"),
    ("eos", "stop"), ("something_new", None), (None, None),
])
async def test_finish_reason_is_normalised(openai_server: LoopbackServer, raw: str | None,
                                           expected: str | None) -> None:
    openai_server.queue(openai_reply("x", finish_reason=raw))
    assert (await complete(openai_server)).finish_reason == expected


async def test_openai_compatible_without_key_env_sends_a_dummy_key(
    openai_server: LoopbackServer,
) -> None:
    done = await complete(openai_server, provider="openai-compatible", api_key_env=None)
    assert done.text == "ok"
    auth = openai_server.requests[0].headers["authorization"]
    assert auth.startswith("Bearer ") and KEY not in auth


async def test_missing_key_variable_names_it_and_sends_nothing(
    openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV)
    err = await fail(openai_server)
    assert isinstance(err, AuthenticationError)
    assert KEY_ENV in str(err)
    assert openai_server.requests == []


async def test_the_client_is_reused_across_calls(openai_server: LoopbackServer) -> None:
    async with provider(rung(openai_server)) as p:
        for _ in range(3):
            await p.complete(call())
    assert len(openai_server.requests) == 3


async def test_concurrent_calls_share_one_provider(openai_server: LoopbackServer) -> None:
    def handler(req: RecordedRequest) -> Reply:
        return openai_reply(req.json["messages"][-1]["content"].upper(), delay_s=0.05)

    openai_server.script(handler)
    results: dict[int, str] = {}
    async with provider(rung(openai_server)) as p:

        async def one(i: int) -> None:
            results[i] = (await p.complete(call(messages=(Message("user", f"q{i}"),)))).text

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert results == {i: f"Q{i}" for i in range(50)}
    assert len(openai_server.requests) == 50


# ---------------------------------------------------------------- structured output (instructor)


async def test_token_limit_and_temperature_by_server_and_model(
    openai_server: LoopbackServer,
) -> None:
    """Compatible servers get ``max_tokens``; OpenAI's reasoning models get no temperature
    (they refuse any but the default) while its other models keep theirs."""
    for _ in range(3):
        openai_server.queue(Reply(json=openai_chat("4")))
    await complete(openai_server, call(temperature=0.2), provider="openai-compatible")
    await complete(openai_server, call(model="o4-mini", temperature=0.2))
    await complete(openai_server, call(model="gpt-4o-mini", temperature=0.2))
    compatible, reasoning, chat = (r.json for r in openai_server.requests)
    assert compatible["max_tokens"] == 64 and "max_completion_tokens" not in compatible
    assert compatible["temperature"] == 0.2
    assert reasoning["max_completion_tokens"] == 64 and "temperature" not in reasoning
    assert chat["max_completion_tokens"] == 64 and chat["temperature"] == 0.2


async def test_structured_output_valid(openai_server: LoopbackServer) -> None:
    openai_server.queue(Reply(json=openai_tool_chat(
        "Pet", json.dumps({"name": "Rex", "age": 3}), prompt_tokens=30, completion_tokens=9
    )))
    done = await complete(openai_server, call(output_type=Pet), structured_output="tools")

    assert done.parsed == Pet(name="Rex", age=3)
    assert done.parse_error is None
    assert json.loads(done.text) == {"name": "Rex", "age": 3}
    assert (done.input_tokens, done.output_tokens) == (30, 9)
    sent = openai_server.requests[0].json
    assert sent["tools"][0]["function"]["name"] == "Pet"
    assert sent["max_completion_tokens"] == 64
    assert len(openai_server.requests) == 1


async def test_structured_output_invalid_is_returned_unparsed(
    openai_server: LoopbackServer,
) -> None:
    openai_server.queue(Reply(json=openai_tool_chat(
        "Pet", json.dumps({"name": "Rex", "age": "old"}), prompt_tokens=30, completion_tokens=9
    )))
    done = await complete(openai_server, call(output_type=Pet), structured_output="tools")

    assert done.parsed is None
    assert done.parse_error is not None and "age" in done.parse_error
    assert json.loads(done.text) == {"name": "Rex", "age": "old"}
    assert (done.input_tokens, done.output_tokens) == (30, 9)
    assert len(openai_server.requests) == 1  # reasks=0: instructor does not ask again


async def test_structured_output_reask_sums_usage(openai_server: LoopbackServer) -> None:
    openai_server.queue(
        Reply(json=openai_tool_chat("Pet", '{"name": "Rex"}', prompt_tokens=30,
                                    completion_tokens=5)),
        Reply(json=openai_tool_chat("Pet", '{"name": "Rex", "age": 3}', prompt_tokens=50,
                                    completion_tokens=9)),
    )
    done = await complete(openai_server, call(output_type=Pet, reasks=1),
                          structured_output="tools")
    assert done.parsed == Pet(name="Rex", age=3)
    assert (done.input_tokens, done.output_tokens) == (80, 14)
    assert len(openai_server.requests) == 2


async def test_structured_output_cut_at_max_tokens(openai_server: LoopbackServer) -> None:
    openai_server.queue(Reply(json=openai_tool_chat("Pet", '{"name": "Re',
                                                    finish_reason="length")))
    done = await complete(openai_server, call(output_type=Pet), structured_output="tools")
    assert done.parsed is None and done.parse_error is not None
    assert done.finish_reason == "length"
    assert done.text == '{"name": "Re'


async def test_structured_output_json_object_mode_puts_schema_in_prompt(
    openai_server: LoopbackServer,
) -> None:
    openai_server.queue(openai_reply('{"name": "Rex", "age": 3}'))
    done = await complete(openai_server, call(output_type=Pet), provider="openai-compatible",
                          structured_output="json_object")
    assert done.parsed == Pet(name="Rex", age=3)
    sent = openai_server.requests[0].json
    assert sent["response_format"] == {"type": "json_object"}
    assert "tools" not in sent
    assert '"age"' in sent["messages"][0]["content"]  # the schema, as a system message


async def test_pydantic_on_compatible_rung_sends_the_schema_and_validates_it(
    openai_server: LoopbackServer,
) -> None:
    """The default (json_schema) sends pydantic's schema, so a server's grammar can enforce it,
    and the reply is still validated with pydantic: a missing field is a parse error."""
    openai_server.queue(openai_reply('{"name": "Rex", "age": 3}'),
                        openai_reply('{"name": "Rex"}'))
    done = await complete(openai_server, call(output_type=Pet), provider="openai-compatible")
    assert done.parsed == Pet(name="Rex", age=3) and type(done.parsed) is Pet
    fmt = openai_server.requests[0].json["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == Pet.model_json_schema()
    bad = await complete(openai_server, call(output_type=Pet), provider="openai-compatible")
    assert bad.parsed is None and bad.parse_error is not None and "age" in bad.parse_error


@pytest.mark.parametrize(("mode", "field", "expect"), [
    ("json_schema", "response_format", {"type": "json_schema",
                                        "json_schema": {"name": "Pet", "schema": PET_SCHEMA}}),
    ("json_object_schema", "response_format", {"type": "json_object", "schema": PET_SCHEMA}),
    ("json_object", "response_format", {"type": "json_object"}),
    ("tools", "tool_choice", {"type": "function", "function": {"name": "Pet"}}),
    ("prompt", "response_format", None),
])
async def test_each_structured_output_mode_sends_its_fields(
    openai_server: LoopbackServer, mode: str, field: str, expect: object,
) -> None:
    body = json.dumps({"name": "Rex", "age": 3})
    openai_server.queue(Reply(json=openai_tool_chat("Pet", body)) if mode == "tools"
                        else openai_reply(body))
    done = await complete(openai_server, call(json_schema=PET_SCHEMA), structured_output=mode,
                          provider="openai-compatible")
    assert json.loads(done.text) == {"name": "Rex", "age": 3}
    sent = openai_server.requests[0].json
    assert sent.get(field) == expect
    in_prompt = '"age"' in sent["messages"][0]["content"]
    assert in_prompt == (mode in ("json_object", "prompt"))


async def test_structured_output_errors_are_translated(openai_server: LoopbackServer) -> None:
    openai_server.queue(openai_error(503, "overloaded", type="server_error"))
    err = await fail(openai_server, call(output_type=Pet))
    assert isinstance(err, ServerError) and err.status_code == 503
    openai_server.queue(Reply(json={**openai_chat(), "choices": []}))
    assert isinstance(await fail(openai_server, call(output_type=Pet)), MalformedReply)


# ---------------------------------------------------------------- error translation


async def test_429_with_retry_after_seconds(openai_server: LoopbackServer) -> None:
    openai_server.queue(openai_error(429, "slow down", headers={"Retry-After": "7"}))
    err = await fail(openai_server)
    assert isinstance(err, RateLimited) and err.retryable
    assert err.retry_after_s == 7.0 and err.status_code == 429
    assert "slow down" in str(err)
    assert len(openai_server.requests) == 1


async def test_429_with_retry_after_date_and_ms(openai_server: LoopbackServer) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    openai_server.queue(openai_error(429, headers={"Retry-After": when}))
    err = await fail(openai_server)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s is not None and 25 <= err.retry_after_s <= 31

    openai_server.queue(openai_error(429, headers={"retry-after-ms": "1500", "Retry-After": "9"}))
    err = await fail(openai_server)
    assert isinstance(err, RateLimited) and err.retry_after_s == 1.5

    openai_server.queue(openai_error(429))
    err = await fail(openai_server)
    assert isinstance(err, RateLimited) and err.retry_after_s is None
    assert len(openai_server.requests) == 3


@pytest.mark.parametrize(("status", "kind"), [
    (500, ServerError), (502, ServerError), (503, ServerError),
    (401, AuthenticationError), (403, AuthenticationError),
    (400, ClientRequestError), (404, ClientRequestError), (422, ClientRequestError),
    (408, ProviderTimeout),
])
async def test_status_codes(openai_server: LoopbackServer, status: int,
                            kind: type[ProviderError]) -> None:
    openai_server.queue(openai_error(status, f"status {status} here"))
    err = await fail(openai_server)
    assert type(err) is kind
    assert err.status_code == status
    assert f"status {status} here" in str(err)
    assert len(openai_server.requests) == 1  # the SDK's own retries are off


async def test_key_echoed_by_the_server_is_scrubbed(openai_server: LoopbackServer) -> None:
    openai_server.queue(openai_error(401, f"Incorrect API key provided: {KEY}."))
    err = await fail(openai_server)
    assert isinstance(err, AuthenticationError)
    assert "Incorrect API key provided" in str(err)
    assert err.__cause__ is None and err.__suppress_context__


@pytest.mark.parametrize(("reply", "needle"), [
    (Reply(body=b'{"id": "x", "choices": [', content_type="application/json"), "JSON"),
    (Reply(body=b"<html>hello</html>", content_type="text/html"), "content type"),
    (Reply(json={**openai_chat(), "choices": []}), "empty"),
    (Reply(json={k: v for k, v in openai_chat().items() if k != "choices"}), "choices"),
    (Reply(json={**openai_chat(), "choices": "many"}), "choices"),
    (Reply(json={**openai_chat(), "choices": [{"index": 0, "finish_reason": "stop"}]}),
     "message"),
    (Reply(json=openai_chat(None)), "null"),
    (Reply(json={**openai_chat(), "choices": [
        {"index": 0, "message": {"role": "assistant", "content": 42}, "finish_reason": "stop"}
    ]}), "int"),
    (Reply(json={k: v for k, v in openai_chat().items() if k != "usage"}), "usage"),
    (Reply(json={**openai_chat(), "usage": {"prompt_tokens": "7", "completion_tokens": 1}}),
     "usage"),
    (Reply(json=[1, 2, 3]), "choices"),
])
async def test_malformed_replies(openai_server: LoopbackServer, reply: Reply,
                                 needle: str) -> None:
    openai_server.queue(reply)
    err = await fail(openai_server)
    assert isinstance(err, MalformedReply) and err.retryable
    assert needle in str(err)


async def test_timeout(openai_server: LoopbackServer) -> None:
    openai_server.queue(openai_reply("late", delay_s=2.0))
    t0 = time.perf_counter()
    err = await fail(openai_server, call(timeout_s=0.2))
    assert isinstance(err, ProviderTimeout) and err.retryable
    assert time.perf_counter() - t0 < 1.5
    assert len(openai_server.requests) == 1


async def test_reset_mid_body(openai_server: LoopbackServer) -> None:
    openai_server.queue(Reply(json=openai_chat("a long answer " * 20), fault="reset"))
    err = await fail(openai_server)
    assert type(err) is TransportError
    assert len(openai_server.requests) == 1


@pytest.mark.parametrize("fault", ["close", "garbage"])
async def test_connection_faults(openai_server: LoopbackServer, fault: Any) -> None:
    openai_server.queue(Reply(fault=fault))
    err = await fail(openai_server)
    assert type(err) is TransportError
    assert len(openai_server.requests) == 1


async def test_server_down(openai_server: LoopbackServer) -> None:
    openai_server.down()
    err = await fail(openai_server)
    assert type(err) is TransportError and "connection failed" in str(err)
    openai_server.up()
    assert (await complete(openai_server)).text == "ok"


async def test_nothing_listening() -> None:
    r = rung(None, base_url=f"http://127.0.0.1:{free_port()}/v1")
    async with provider(r) as p:
        with pytest.raises(TransportError):
            await p.complete(call())


# ---------------------------------------------------------------- the registry


def test_make_provider_dispatch() -> None:
    assert isinstance(make_provider(rung(None)), OpenAIProvider)
    assert isinstance(make_provider(rung(None, provider="openai-compatible",
                                         base_url="http://127.0.0.1:1/v1")), OpenAIProvider)
    assert {"openai", "openai-compatible", "anthropic"} <= set(known_providers())


def test_unknown_provider_lists_known_kinds() -> None:
    bad = rung(None).__class__(model="m", provider="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        make_provider(bad)
    assert "nope" in str(info.value) and "openai-compatible" in str(info.value)


def test_register_provider() -> None:
    made: list[RungConfig] = []

    class Fake(Provider):
        async def complete(self, call: ModelCall) -> Completion:
            raise NotImplementedError

    def factory(r: RungConfig) -> Provider:
        made.append(r)
        return Fake()

    register_provider("fake-kind-for-test", factory)
    r = RungConfig(model="m", provider="fake-kind-for-test")  # type: ignore[arg-type]
    assert isinstance(make_provider(r), Fake) and made == [r]
    assert "fake-kind-for-test" in known_providers()


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(12, abs=1)
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)},
                             now=now) == 0.0
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "4"}) == 4.0
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


@pytest.mark.slow
async def test_loopback_serves_a_thousand_concurrent_calls(openai_server: LoopbackServer) -> None:
    def handler(req: RecordedRequest) -> Reply:
        return openai_reply(req.json["messages"][-1]["content"], delay_s=0.2)

    openai_server.script(handler)
    texts: list[str] = []
    t0 = time.perf_counter()
    async with provider(rung(openai_server)) as p:

        async def one(i: int) -> None:
            texts.append((await p.complete(call(messages=(Message("user", f"q{i}"),),
                                                 timeout_s=60))).text)

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i)
    elapsed = time.perf_counter() - t0
    assert sorted(texts) == sorted(f"q{i}" for i in range(1000))
    assert len(openai_server.requests) == 1000
    assert elapsed < 60, elapsed


async def test_structured_output_json_mode_with_broken_json(
    openai_server: LoopbackServer,
) -> None:
    openai_server.queue(openai_reply('{"name": "Rex", "age": '))
    done = await complete(openai_server, call(output_type=Pet), provider="openai-compatible")
    assert done.parsed is None and done.parse_error
    assert done.text == '{"name": "Rex", "age": '


async def test_loopback_lists_models(openai_server: LoopbackServer) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key="unused", base_url=openai_server.base_url, max_retries=0)
    try:
        models = await client.models.list()
    finally:
        await client.close()
    assert [m.id for m in models.data] == ["gpt-test"]
    assert openai_server.requests[0].method == "GET"

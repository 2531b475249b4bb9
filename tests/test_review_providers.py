"""What an adversarial review of the provider boundary, config and CLI found: each test drives
the real SDKs against loopback servers on 127.0.0.1 (or the config parser / CLI directly) and
failed before its fix."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade.cli import main
from cascade.config import RungConfig, parse_config
from cascade.errors import (
    AuthenticationError,
    ClientRequestError,
    ConfigError,
    ProviderError,
)
from cascade.messages import Message
from cascade.providers import make_provider
from cascade.providers.base import Completion, ModelCall
from tests.loopback import LoopbackServer, Reply, anthropic_message, openai_reply

pytestmark = pytest.mark.anyio

KEY = "sk-review-SECRET-0123456789abcdef"
KEY_ENV = "CASCADE_TEST_REVIEW_KEY"
CALL = ModelCall(model="gpt-test", messages=(Message("user", "2+2?"),), max_tokens=16,
                 timeout_s=10.0)
CLAUDE = ModelCall(model="claude-test", messages=(Message("user", "2+2?"),), max_tokens=16,
                   timeout_s=10.0)
FREE = {"input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}


@pytest.fixture
def second_server() -> Iterator[LoopbackServer]:
    """Another OpenAI-speaking host: where a fallback goes."""
    with LoopbackServer("openai") as server:
        yield server


async def complete(r: RungConfig, call: ModelCall = CALL) -> Completion:
    p = make_provider(r)
    try:
        return await p.complete(call)
    finally:
        await p.aclose()


def _chain(exc: BaseException) -> list[BaseException]:
    """Every exception reachable from ``exc`` through ``__cause__`` and ``__context__``."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


# ---------------------------------------------------------------- keys and hosts


async def test_a_fallback_at_another_host_is_not_sent_the_vendor_key(
        openai_server: LoopbackServer, second_server: LoopbackServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rung names OPENAI_API_KEY for its host; a fallback at another host names none. Its
    api_key_env was cleared, but the openai kind then read OPENAI_API_KEY by default and sent
    it to the other host anyway."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cfg = parse_config({"rungs": [{
        "model": "gpt-test", "provider": "openai", "base_url": openai_server.base_url,
        "api_key_env": "OPENAI_API_KEY", **FREE,
        "fallbacks": [{"base_url": second_server.base_url}]}]})
    fb = cfg.rungs[0].fallbacks[0]
    second_server.queue(openai_reply("4"))
    with pytest.raises(AuthenticationError) as info:
        await complete(fb)
    assert "api_key_env" in str(info.value)
    assert all(KEY not in " ".join(r.headers.values()) for r in second_server.requests)


async def test_an_anthropic_rung_at_another_host_does_not_read_the_vendor_key(
        anthropic_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same for the anthropic kind: ANTHROPIC_API_KEY goes to api.anthropic.com only, unless
    the config names the variable for that host."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    anthropic_server.queue(Reply(json=anthropic_message("4")))
    r = RungConfig(model="claude-test", provider="anthropic", base_url=anthropic_server.base_url)
    with pytest.raises(AuthenticationError):
        await complete(r, CLAUDE)
    assert all(KEY not in " ".join(q.headers.values()) for q in anthropic_server.requests)
    named = RungConfig(model="claude-test", provider="anthropic",
                       base_url=anthropic_server.base_url, api_key_env="ANTHROPIC_API_KEY")
    assert (await complete(named, CLAUDE)).text == "4"
    sent = anthropic_server.requests[-1].headers
    assert KEY in sent.get("x-api-key", "") + sent.get("authorization", "")


def test_a_fallback_of_another_kind_does_not_inherit_the_rungs_base_url() -> None:
    """A vLLM rung with an ``openai`` fallback (the official API) sent that fallback, and
    OPENAI_API_KEY with it, to the vLLM host."""
    cfg = parse_config({"rungs": [{
        "model": "gpt-4o", "provider": "openai-compatible",
        "base_url": "http://10.0.0.5:8000/v1",
        "fallbacks": [{"provider": "openai"}, {"base_url": "http://10.0.0.6:8000/v1"}]}]})
    official, other = cfg.rungs[0].fallbacks
    assert official.base_url is None
    assert other.base_url == "http://10.0.0.6:8000/v1"  # same kind: inherits what it does not say


@pytest.mark.parametrize("value", [KEY, "$OPENAI_API_KEY", "OPENAI API KEY", "sk-ant-api03-xyz"])
def test_api_key_env_must_be_a_variable_name(value: str) -> None:
    """A key pasted into api_key_env validated, and the call's error then printed it into the
    trace ('the environment variable sk-... is not set')."""
    with pytest.raises(ConfigError) as info:
        parse_config({"rungs": [{"model": "gpt-4o", "api_key_env": value}]})
    assert info.value.key == "rungs[0].api_key_env"
    assert value not in str(info.value)


async def test_no_sdk_exception_holding_the_key_hangs_off_the_typed_error(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401 body echoing the key: the typed error was scrubbed, but ``raise ... from None``
    inside the handler left the SDK's exception (its message quoting the body, its response
    holding the request with the Authorization header) on ``__context__``."""
    monkeypatch.setenv(KEY_ENV, KEY)
    openai_server.queue(Reply(status=401, json={"error": {
        "message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}))
    r = RungConfig(model="gpt-test", provider="openai-compatible",
                   base_url=openai_server.base_url, api_key_env=KEY_ENV)
    with pytest.raises(AuthenticationError) as info:
        await complete(r)
    for e in _chain(info.value):
        assert KEY not in str(e) and KEY not in repr(e), type(e)
        assert not hasattr(e, "response"), type(e)


# ---------------------------------------------------------------- usage and errors


async def test_anthropic_cached_input_tokens_are_counted(
        anthropic_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With prompt caching, Anthropic's ``input_tokens`` leaves out the cached part
    (``cache_read_input_tokens``, ``cache_creation_input_tokens``): 10 tokens were billed
    for a 3 010-token prompt."""
    monkeypatch.setenv(KEY_ENV, KEY)
    body = anthropic_message("4", input_tokens=10, output_tokens=2)
    body["usage"].update(cache_read_input_tokens=2000, cache_creation_input_tokens=1000)
    anthropic_server.queue(Reply(json=body))
    r = RungConfig(model="claude-test", provider="anthropic", base_url=anthropic_server.base_url,
                   api_key_env=KEY_ENV)
    done = await complete(r, CLAUDE)
    assert (done.input_tokens, done.output_tokens) == (3010, 2)


async def test_409_conflict_is_retryable(openai_server: LoopbackServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Both SDKs retry 409 (OpenAI's lock timeout) themselves; with their retries switched
    off it must stay retryable here, not become a final ClientRequestError."""
    monkeypatch.setenv(KEY_ENV, KEY)
    openai_server.queue(Reply(status=409, json={"error": {
        "message": "Lock timeout.", "type": "server_error", "param": None, "code": None}}))
    r = RungConfig(model="gpt-test", provider="openai-compatible",
                   base_url=openai_server.base_url, api_key_env=KEY_ENV)
    with pytest.raises(ProviderError) as info:
        await complete(r)
    assert info.value.retryable and info.value.status_code == 409


async def test_a_context_length_error_says_so(openai_server: LoopbackServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI answers a too-long prompt with ``param: "messages"``; the error told the user
    "the server does not take 'messages'" and to change the rung's settings."""
    monkeypatch.setenv(KEY_ENV, KEY)
    openai_server.queue(Reply(status=400, json={"error": {
        "message": "This model's maximum context length is 8192 tokens. However, your "
                   "messages resulted in 9000 tokens.", "type": "invalid_request_error",
        "param": "messages", "code": "context_length_exceeded"}}))
    r = RungConfig(model="gpt-test", provider="openai-compatible",
                   base_url=openai_server.base_url, api_key_env=KEY_ENV)
    with pytest.raises(ClientRequestError) as info:
        await complete(r)
    message = str(info.value)
    assert "does not take" not in message and "context" in message
    assert not info.value.retryable


# ---------------------------------------------------------------- config that misbehaved


@pytest.mark.parametrize(("provider", "field"), [
    ("openai", "max_tokens"), ("openai", "max_completion_tokens"), ("openai", "model"),
    ("openai-compatible", "messages"), ("openai-compatible", "stream"), ("openai", "n"),
    ("anthropic", "max_tokens"), ("anthropic", "system"),
])
def test_extra_cannot_override_what_the_rung_sets(provider: str, field: str) -> None:
    """``extra`` is merged over the body: ``extra.max_tokens = 4096`` on a 512-token rung
    broke every cost cap (estimated at 512), ``extra.model`` billed one model at another's
    price, ``extra.stream`` made every reply unreadable."""
    rung: dict[str, Any] = {"model": "gpt-4o", "provider": provider, "extra": {field: 1}}
    if provider == "openai-compatible":
        rung["base_url"] = "http://127.0.0.1:8000/v1"
    with pytest.raises(ConfigError) as info:
        parse_config({"rungs": [rung]})
    assert info.value.key == f"rungs[0].extra.{field}"


def test_extra_keeps_the_fields_it_is_for() -> None:
    """What README sends through ``extra`` still validates (and a plugin's own table is its
    own)."""
    cfg = parse_config({"rungs": [
        {"model": "claude-sonnet-4-5", "provider": "anthropic",
         "extra": {"temperature": 0.2, "top_k": 5}},
        {"model": "m", "provider": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1",
         "extra": {"guided_json": {}, "stop": ["x"]}, **FREE},
    ]})
    assert cfg.rungs[0].extra["top_k"] == 5


def test_an_anthropic_base_url_ending_in_v1_is_refused() -> None:
    """The Anthropic SDK adds /v1/messages itself: ``base_url = ".../v1"`` (the OpenAI habit)
    validated and then every call went to /v1/v1/messages, a 404. Only Anthropic's own host
    is refused: a gateway may document a /v1 base URL for this SDK (and route the doubled
    path)."""
    with pytest.raises(ConfigError) as info:
        parse_config({"rungs": [{"model": "claude-sonnet-4-5", "provider": "anthropic",
                                 "base_url": "https://api.anthropic.com/v1/"}]})
    assert info.value.key == "rungs[0].base_url" and "/v1" in str(info.value)
    gw = parse_config({"rungs": [{"model": "claude-sonnet-4-5", "provider": "anthropic",
                                  "api_key_env": "GATEWAY_KEY",
                                  "base_url": "https://gateway.example/anthropic/v1"}]})
    assert gw.rungs[0].base_url == "https://gateway.example/anthropic/v1"


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("timeout", ["nan", "-1", "0", "soon"])
def test_health_refuses_a_timeout_that_cannot_hold(tmp_path: Path, timeout: str) -> None:
    """``cascade health --probe --timeout nan`` printed anyio's traceback (exit 1); -1 and 0
    reported every endpoint down (exit 3), a container health check that always fails."""
    config = tmp_path / "cascade.toml"
    config.write_text('[[rungs]]\nmodel = "m"\nprovider = "openai-compatible"\n'
                      'base_url = "http://127.0.0.1:9/v1"\nprice = "unknown"\n')
    out, err = io.StringIO(), io.StringIO()
    code = main(["health", "--probe", "--timeout", timeout, "--config", str(config)],
                out=out, err=err)
    assert code == 2, err.getvalue()
    assert "Traceback" not in err.getvalue() and "--timeout" in err.getvalue()
    assert out.getvalue() == ""


# ---------------------------------------------------------------- token estimates


@pytest.mark.parametrize("text", ["😀🎉🚀" * 30, "中华人民共和国是一个国家" * 20,
                                  "नमस्ते दुनिया " * 20, "مرحبا بالعالم " * 20],
                         ids=["emoji", "chinese", "hindi", "arabic"])
def test_the_fallback_estimate_does_not_undercount_non_ascii_text(text: str) -> None:
    """Without an encoding file the estimate was ceil(characters / 4): 23 tokens for 90 emoji
    that cl100k encodes in 240, so a cost cap could be passed tenfold."""
    import tiktoken

    from cascade.tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, fallback_tokens

    actual = max(len(tiktoken.get_encoding(n).encode_ordinary(text))
                 for n in ("cl100k_base", "o200k_base"))
    overhead = REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + 1
    assert fallback_tokens([Message("user", text)]) - overhead >= actual
    assert fallback_tokens([Message("user", "abcdefghi")]) == overhead + 3  # ASCII: chars/4

"""The rung's ``transport``: the SDKs' httpx client or their aiohttp option, chosen per call's
event loop, with the same reply cap and the same error kinds on both (real SDKs, loopback)."""

from __future__ import annotations

from typing import Any

import pytest

from cascade.config import RungConfig, parse_config
from cascade.errors import ConfigError, ProviderTimeout, ReplyTooLarge, TransportError
from cascade.messages import Message
from cascade.providers import make_provider
from cascade.providers._sdk import SDKProvider
from cascade.providers.base import ModelCall
from tests.loopback import (
    Fault,
    LoopbackServer,
    Reply,
    anthropic_reply,
    free_port,
    openai_reply,
)
from tests.test_providers_hardening import _gzip_bomb

pytestmark = pytest.mark.anyio

KEY_ENV = "CASCADE_TEST_TRANSPORT_KEY"
CALL = ModelCall(model="m", messages=(Message("user", "2+2?"),), max_tokens=16, timeout_s=10.0)
BOTH = pytest.mark.parametrize("transport", ["httpx", "aiohttp"])


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-transport-test")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def _rung(base_url: str, transport: str, **kw: Any) -> RungConfig:
    return RungConfig(model="m", provider="openai", base_url=base_url, api_key_env=KEY_ENV,
                      transport=transport, **kw)


async def _complete(r: RungConfig, call: ModelCall = CALL) -> tuple[Any, str | None]:
    p = make_provider(r)
    assert isinstance(p, SDKProvider)
    try:
        return await p.complete(call), p.transport
    finally:
        await p.aclose()


@BOTH
async def test_a_call_goes_through_the_chosen_client(openai_server: LoopbackServer,
                                                     transport: str) -> None:
    openai_server.queue(openai_reply("4"))
    done, used = await _complete(_rung(openai_server.base_url, transport))
    assert (done.text, used) == ("4", transport)
    assert openai_server.requests[0].json["messages"][0]["content"] == "2+2?"


@BOTH
async def test_anthropic_goes_through_the_chosen_client(anthropic_server: LoopbackServer,
                                                        transport: str) -> None:
    anthropic_server.queue(anthropic_reply("4"))
    r = RungConfig(model="m", provider="anthropic", base_url=anthropic_server.base_url,
                   api_key_env=KEY_ENV, transport=transport)
    done, used = await _complete(r)
    assert (done.text, used) == ("4", transport)


@BOTH
async def test_the_reply_cap_holds_on_both(openai_server: LoopbackServer,
                                           transport: str) -> None:
    openai_server.queue(Reply(body=_gzip_bomb(64), headers={"Content-Encoding": "gzip"}))
    with pytest.raises(ReplyTooLarge, match="max_reply_bytes = 1048576"):
        await _complete(_rung(openai_server.base_url, transport, max_reply_bytes=1 << 20))


@BOTH
async def test_a_refused_connection_is_a_transport_error_not_a_timeout(transport: str) -> None:
    with pytest.raises(TransportError, match="connection failed") as info:
        await _complete(_rung(f"http://127.0.0.1:{free_port()}/v1", transport))
    assert not isinstance(info.value, ProviderTimeout)


@BOTH
@pytest.mark.parametrize("fault", ["close", "reset", "garbage"])
async def test_a_broken_connection_is_a_transport_error_not_a_timeout(
        openai_server: LoopbackServer, transport: str, fault: Fault) -> None:
    openai_server.queue(Reply(fault=fault))
    with pytest.raises(TransportError) as info:
        await _complete(_rung(openai_server.base_url, transport, max_retries=0))
    assert not isinstance(info.value, ProviderTimeout)


@BOTH
async def test_a_slow_server_is_a_timeout_on_both(openai_server: LoopbackServer,
                                                  transport: str) -> None:
    openai_server.queue(Reply(json={}, delay_s=2.0))
    with pytest.raises(ProviderTimeout):
        await _complete(_rung(openai_server.base_url, transport),
                        ModelCall(model="m", messages=CALL.messages, timeout_s=0.3))


async def test_auto_takes_aiohttp_on_asyncio(openai_server: LoopbackServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "example.com")  # exceptions alone are no proxy
    openai_server.queue(openai_reply("4"))
    assert (await _complete(_rung(openai_server.base_url, "auto")))[1] == "aiohttp"


async def test_auto_keeps_httpx_when_a_proxy_is_set(openai_server: LoopbackServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours the proxy variables and the SDK's aiohttp client does not: auto must not
    route around a proxy the user set (NO_PROXY lets this loopback call bypass it)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    openai_server.queue(openai_reply("4"))
    done, used = await _complete(_rung(openai_server.base_url, "auto"))
    assert (done.text, used) == ("4", "httpx")


async def test_an_explicit_aiohttp_behind_a_proxy_says_it_goes_around_it(
        openai_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    openai_server.queue(openai_reply("4"))
    with caplog.at_level("WARNING", logger="cascade"):
        done, used = await _complete(_rung(openai_server.base_url, "aiohttp"))
    assert (done.text, used) == ("4", "aiohttp")
    assert "ignoring the https proxy" in caplog.text and "'auto' or 'httpx'" in caplog.text


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_auto_takes_httpx_on_trio(openai_server: LoopbackServer) -> None:
    openai_server.queue(openai_reply("4"))
    done, used = await _complete(_rung(openai_server.base_url, "auto"))
    assert (done.text, used) == ("4", "httpx")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_aiohttp_on_trio_is_a_config_error_naming_the_setting(
        openai_server: LoopbackServer) -> None:
    with pytest.raises(ConfigError, match=r"transport.*needs an asyncio event loop.*'httpx'"):
        await _complete(_rung(openai_server.base_url, "aiohttp"))
    assert openai_server.requests == []


def test_config_takes_the_three_values_and_names_a_bad_one() -> None:
    def cfg(value: str) -> dict[str, Any]:
        return {"rungs": [{"model": "m", "price": "unknown", "transport": value}]}

    assert [parse_config(cfg(v)).rungs[0].transport for v in ("auto", "httpx", "aiohttp")] \
        == ["auto", "httpx", "aiohttp"]
    assert RungConfig(model="m").transport == "auto"
    with pytest.raises(ConfigError, match=r"rungs\[0\]\.transport.*'curl'.*auto, httpx, aiohttp"):
        parse_config(cfg("curl"))

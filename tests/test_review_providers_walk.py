"""Provider money defects from a black-box review walk: each test failed on the code before its
fix.

The Anthropic SDK's aiohttp client maps every ``aiohttp.ClientConnectionError`` to httpx's
``ConnectError``, which read as "never sent": a server that hung up after reading the request
(the model may have run, and billed) kept $0, where httpx, or the OpenAI SDK on either
client, kept the call's estimate.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import cascade
from cascade import Cascade
from cascade.budget import InMemoryBudgetStore
from tests.loopback import LoopbackServer, Reply

pytestmark = pytest.mark.anyio

KEY_ENV = "CASCADE_TEST_WALK_KEY"
PROVIDERS = {"openai": "openai-compatible", "anthropic": "anthropic"}
PERIOD = 86400.0


def _config(kind: str, base_url: str, transport: str) -> dict[str, Any]:
    """One rung with output-only prices, so its estimate is exact: $0.01 (max_tokens 10), and
    one try, so the budget holds that try's keep and nothing else."""
    rung = {"model": "small", "provider": PROVIDERS[kind], "base_url": base_url,
            "api_key_env": KEY_ENV, "max_tokens": 10, "input_usd_per_mtok": 0.0,
            "output_usd_per_mtok": 1000.0, "timeout_s": 5.0, "max_retries": 0,
            "transport": transport}
    return {"rungs": [rung], "cache": {"enabled": False}, "budget": {"limit_usd": 1.0},
            "retry": {"max_attempts": 1}, "verifiers": [{"name": "refusal"}]}


async def _failed_attempt(kind: str, base_url: str, transport: str
                          ) -> tuple[Any, InMemoryBudgetStore]:
    store = InMemoryBudgetStore()
    async with Cascade.from_dict(_config(kind, base_url, transport), budget_store=store) as c:
        with pytest.raises(cascade.NoAnswerError) as info:
            await c.aanswer("Capital of Australia?")
    [attempt] = info.value.answer.attempts
    assert attempt.status == "error" and attempt.error_type == "TransportError"
    return attempt, store


@pytest.fixture(params=["openai", "anthropic"])
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[LoopbackServer]:
    monkeypatch.setenv(KEY_ENV, "sk-walk-test")
    with LoopbackServer(request.param) as srv:
        yield srv


@pytest.fixture
def rst_after_request(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server that reads a request's head, then resets the connection (SO_LINGER 0) before
    any reply byte: aiohttp's ``ClientOSError`` (ECONNRESET), httpx's ``ReadError``."""
    monkeypatch.setenv(KEY_ENV, "sk-walk-test")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener closed: the test is over
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, name="rst-after-request", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
    assert got and got[0].startswith(b"POST "), "the request never reached the server"


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_server_that_closes_after_the_request_keeps_the_estimate(
        server: LoopbackServer, transport: str) -> None:
    """The server read the whole request, then closed the connection without a reply: the try
    was sent, so the budget keeps its estimate. The Anthropic rung on aiohttp (what ``auto``
    picks on asyncio) kept $0, and its error said ConnectError."""
    server.script(lambda req: Reply(fault="close"))
    attempt, store = await _failed_attempt(server.kind, server.base_url, transport)
    assert len(server.requests) == 1
    assert "RemoteProtocolError" in (attempt.error or "")  # as httpx says, not ConnectError
    assert "budget keeps $0.010000" in (attempt.note or "")
    assert store.spent("default", PERIOD) == pytest.approx(0.01)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_reset_after_the_request_keeps_the_estimate(
        rst_after_request: str, kind: str, transport: str) -> None:
    """A reset (not a clean close) after the request was read: aiohttp's ``ClientOSError``,
    which the Anthropic SDK's aiohttp client also calls ``ConnectError``."""
    base_url = rst_after_request + ("/v1" if kind == "openai" else "")
    attempt, store = await _failed_attempt(kind, base_url, transport)
    assert "budget keeps $0.010000" in (attempt.note or "")
    assert store.spent("default", PERIOD) == pytest.approx(0.01)


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_refused_connection_keeps_nothing(
        server: LoopbackServer, transport: str) -> None:
    """A connection that never opened sent nothing: nothing to bill, nothing kept."""
    server.down()
    attempt, store = await _failed_attempt(server.kind, server.base_url, transport)
    assert server.requests == []
    assert attempt.note is None
    assert store.spent("default", PERIOD) == 0.0


_SENT = {"ServerDisconnectedError": True, "ClientPayloadError": True, "ClientOSError": True,
         "ClientConnectionResetError": True, "SocketTimeoutError": True,
         "ClientConnectorError": False, "ClientConnectorDNSError": False,
         "ClientProxyConnectionError": False, "ClientConnectorSSLError": False,
         "ConnectionTimeoutError": False}
"""aiohttp failures and whether each came after the request went out. Mind the hierarchy:
``ClientConnectorError`` (connect phase) subclasses ``ClientOSError`` (which a reset mid-read
also raises); ``ConnectionTimeoutError`` sits beside the read timeout under
``ServerConnectionError``, as ``ServerDisconnectedError`` does."""


def _aiohttp_error(name: str) -> BaseException:
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    cls: type[BaseException] = getattr(aiohttp, name)
    if issubclass(cls, aiohttp.ClientConnectorError):
        key = ConnectionKey("example.com", 443, True, True, None, None, None)
        return cls(key, ConnectionRefusedError(111, "Connect call failed"))
    if issubclass(cls, aiohttp.ClientOSError):
        return cls(104, "Connection reset by peer")
    return cls() if cls is aiohttp.ServerDisconnectedError else cls("lost")


@pytest.mark.parametrize("sdk_name", ["openai", "anthropic"])
@pytest.mark.parametrize("mapped", ["ConnectError", "ConnectTimeout", "RemoteProtocolError"])
@pytest.mark.parametrize("name", sorted(_SENT))
def test_the_aiohttp_error_behind_the_wrapper_says_whether_it_was_sent(
        sdk_name: str, mapped: str, name: str) -> None:
    """Whatever httpx class an SDK's aiohttp client wraps it in, the aiohttp error the chain
    ends in decides whether the request went out."""
    import importlib

    import httpx2

    from cascade.providers._common import translate_error

    sdk = importlib.import_module(sdk_name)
    request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    wrapped = getattr(httpx2, mapped)(name, request=request)
    wrapped.__cause__ = _aiohttp_error(name)
    top_kind = sdk.APITimeoutError if mapped == "ConnectTimeout" else sdk.APIConnectionError
    top = top_kind(request=request)
    top.__cause__ = wrapped
    err = translate_error(top, sdk, provider=sdk_name, model="m", secret=None)
    assert err is not None and err.sent is _SENT[name]

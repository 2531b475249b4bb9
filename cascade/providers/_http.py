"""The HTTP client the SDK providers hand to their SDK (through its public ``http_client``).

It is one of the SDK's own default clients (same limits and timeouts, redirects followed) with
one addition: the reply body is read here, decoded, and cut off at ``max_reply_bytes`` with
:class:`~cascade.errors.ReplyTooLarge`. The cap counts decoded bytes, so a gzip bomb stops at
the cap as surely as an endless chunked body does, and long before the request's timeout.

Which client is the rung's ``transport``: ``httpx`` (the SDK's default) or the SDK's
``aiohttp`` option (``DefaultAioHttpClient``: the same httpx interface over aiohttp's C HTTP
parser: 0.2-0.4 ms off each request ``cascade serve`` passes on, in bench/serve.py, where the
outbound call was most of what the service adds). ``auto`` takes aiohttp where it is exact:
on an asyncio loop (aiohttp has no trio) and with no proxy in the environment (httpx honours
``HTTPS_PROXY`` and the like; the SDK's aiohttp client does not).
"""

from __future__ import annotations

import logging
import urllib.request
from types import ModuleType
from typing import Any, TypedDict

import httpx2
import sniffio

from cascade.errors import ConfigError, ReplyTooLarge
from cascade.providers._common import is_aiohttp
from cascade.secrets import has_userinfo, mask_http_logs

__all__ = ["capped_client", "pick_transport"]

log = logging.getLogger("cascade")

_DROP = {"content-encoding", "content-length", "transfer-encoding"}


class _Where(TypedDict):
    provider: str
    model: str


class _CapReads:
    """Mixed in before the SDK's client class: reads each non-streamed reply under a cap."""

    max_reply_bytes: int
    where: _Where

    async def send(self, request: httpx2.Request, *, stream: bool = False,
                   **kw: Any) -> httpx2.Response:
        try:
            return await self._read(request, stream, **kw)
        except (httpx2.TimeoutException, httpx2.ConnectError) as e:
            honest = _not_a_timeout(e)
            if honest is None:
                raise
            raise honest from e.__cause__

    async def _read(self, request: httpx2.Request, stream: bool, **kw: Any) -> httpx2.Response:
        response: httpx2.Response = await super().send(  # type: ignore[misc]
            request, stream=True, **kw)
        if stream:  # a streamed call reads as it goes; the providers make none
            return response
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_reply_bytes:
                    raise ReplyTooLarge(
                        f"the reply body passed max_reply_bytes = {self.max_reply_bytes} "
                        "(decoded); raise it on the rung if such replies are expected",
                        status_code=response.status_code, **self.where)
        finally:
            await response.aclose()
        # The body is decoded now, so the encoding headers no longer describe it.
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROP]
        return httpx2.Response(response.status_code, headers=headers, content=bytes(body),
                               request=request, extensions=response.extensions,
                               history=response.history)


def _not_a_timeout(e: httpx2.TimeoutException | httpx2.ConnectError
                   ) -> httpx2.TransportError | None:
    """What a lost aiohttp connection really was. The SDKs' aiohttp clients map every
    ``aiohttp.ClientConnectionError`` to one httpx class (OpenAI's to ``ConnectTimeout``,
    Anthropic's to ``ConnectError``), so a refused connection would read "the request timed
    out" and a server that hung up after reading the request "connection failed
    (ConnectError)"; httpx itself says ConnectError or RemoteProtocolError, and so do we.
    (Whether the request went out is read from the aiohttp error itself, in ``_common``.)"""
    cause = e.__cause__
    if cause is None or not is_aiohttp(type(cause)):
        return None
    import aiohttp

    if not isinstance(cause, aiohttp.ClientConnectionError) or isinstance(
            cause, aiohttp.ServerTimeoutError):
        return None
    connect = isinstance(cause, aiohttp.ClientConnectorError)
    if connect and isinstance(e, httpx2.ConnectError):
        return None  # already what it was
    kind = httpx2.ConnectError if connect else httpx2.RemoteProtocolError
    try:
        request: httpx2.Request | None = e.request
    except RuntimeError:  # raised outside a request's context: none to name
        request = None
    return kind(str(cause) or type(cause).__name__, request=request)


def pick_transport(setting: str, *, rung: str, base_url: str | None = None) -> str:
    """``httpx`` or ``aiohttp`` for a client made now, in the running event loop. A
    ``base_url`` with user info (a basic-auth proxy's) needs httpx: aiohttp refuses it beside
    the SDK's Authorization header, on every call (the config refuses that pair)."""
    on_asyncio = sniffio.current_async_library() == "asyncio"
    userinfo = bool(base_url) and has_userinfo(base_url or "")
    if userinfo:
        mask_http_logs()  # httpx logs each request's URL, password and all
    if setting == "aiohttp" and not on_asyncio:
        raise ConfigError(f"is 'aiohttp', which needs an asyncio event loop and this call runs "
                          f"on {sniffio.current_async_library()}: use 'auto' or 'httpx'",
                          source=f"rung {rung!r}", key="transport")
    proxies = sorted(k for k in urllib.request.getproxies() if k != "no")  # no = NO_PROXY
    if setting == "auto":
        return "aiohttp" if on_asyncio and not proxies and not userinfo else "httpx"
    if setting == "aiohttp" and proxies:
        log.warning("rung %r: transport = 'aiohttp' sends directly, ignoring the %s proxy set "
                    "in the environment; use 'auto' or 'httpx' to go through it", rung,
                    ", ".join(proxies))
    return setting


_CLASSES: dict[type, type] = {}


def capped_client(sdk: ModuleType, max_reply_bytes: int, where: _Where, *,
                  transport: str = "httpx") -> httpx2.AsyncClient:
    """The SDK's default async client class for ``transport`` with :class:`_CapReads` mixed
    in."""
    base: type = sdk.DefaultAioHttpClient if transport == "aiohttp" \
        else sdk.DefaultAsyncHttpxClient
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Capped{base.__name__}", (_CapReads, base), {})
    client: httpx2.AsyncClient = cls()
    client.max_reply_bytes = max_reply_bytes  # type: ignore[attr-defined]
    client.where = where  # type: ignore[attr-defined]
    return client

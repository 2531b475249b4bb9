"""The HTTP client the SDK providers hand to their SDK (through its public ``http_client``).

It is the SDK's own default client (same limits and timeouts, redirects followed) with one
addition: the reply body is read here, decoded, and cut off at ``max_reply_bytes`` with
:class:`~cascade.errors.ReplyTooLarge`. The cap counts decoded bytes, so a gzip bomb stops at
the cap as surely as an endless chunked body does, and long before the request's timeout.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, TypedDict

import httpx2

from cascade.errors import ReplyTooLarge

__all__ = ["capped_client"]

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


_CLASSES: dict[type, type] = {}


def capped_client(sdk: ModuleType, max_reply_bytes: int, where: _Where) -> httpx2.AsyncClient:
    """The SDK's default async client class with :class:`_CapReads` mixed in."""
    base: type = sdk.DefaultAsyncHttpxClient
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Capped{base.__name__}", (_CapReads, base), {})
    client: httpx2.AsyncClient = cls()
    client.max_reply_bytes = max_reply_bytes  # type: ignore[attr-defined]
    client.where = where  # type: ignore[attr-defined]
    return client

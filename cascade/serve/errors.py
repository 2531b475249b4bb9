"""Errors on the wire: every failure leaves as OpenAI's ``{"error": {...}}`` with its status.

:class:`APIError` is what endpoint code raises; :func:`from_exception` translates the engine's
typed errors once, here. Cascade errors carry ``x-should-retry: false``: the cascade has already
retried and failed over inside, and an SDK retrying a no-answer would pay for the climb again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from cascade.errors import (
    BudgetExceeded,
    BudgetStoreError,
    CascadeError,
    ConfigError,
    DeadlineExceeded,
    EndpointConfigError,
    NoAnswerError,
    UnverifiedAnswerError,
)
from cascade.serve.protocol import CascadeTrace, ErrorBody, ErrorResponse

__all__ = ["APIError", "counting_refusals", "cut_by_shutdown", "from_exception", "parse_body",
           "read_body", "refusal_reason"]

_M = TypeVar("_M", bound=BaseModel)

log = logging.getLogger("cascade.serve")

_CLIMB_ERRORS = frozenset({"budget_exceeded", "deadline_exceeded", "no_answer",
                           "unverified_answer", "server_error"})
"""Error types of a climb that ran (the engine's observers count those): not refusals."""


def refusal_reason(e: APIError) -> str:
    return {401: "unauthorised", 404: "unknown_model", 429: "rate_limited"}.get(
        e.status, "bad_request")


@contextlib.contextmanager
def counting_refusals(count: Callable[[str], None]) -> Iterator[None]:
    """Counts (``count(reason)``: ``cascade_refused_requests_total``) a request any endpoint
    turns away before a climb: a bad key, a rate limit, bad input."""
    try:
        yield
    except APIError as e:
        if e.body.type not in _CLIMB_ERRORS and e.status < 500:
            count(refusal_reason(e))
        raise


class APIError(Exception):
    """An error response: status, OpenAI error ``type``, the offending ``param``, a ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 trace: CascadeTrace | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code, cascade=trace)
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, object]:
        """OpenAI's error object always has its four keys (``param`` and ``code`` may be
        null); our ``cascade`` trace only when there is one."""
        out = ErrorResponse(error=self.body).model_dump(mode="json", exclude_none=True)
        error = out["error"]
        assert isinstance(error, dict)
        error.setdefault("param", None)
        error.setdefault("code", None)
        return out

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


_SHUTDOWN_CANCEL = "timeout graceful shutdown exceeded"
"""What uvicorn's cancel of the requests still running at the end of its drain says."""


def cut_by_shutdown(e: BaseException) -> bool:
    """Whether ``e`` is uvicorn cancelling a request its drain timeout ran out on (uvicorn
    does not wait for the task, so the request can still answer, and should)."""
    return isinstance(e, asyncio.CancelledError) and _SHUTDOWN_CANCEL in str(e)


def from_exception(e: BaseException, trace: CascadeTrace | None = None) -> APIError:
    """The wire error for anything the climb raised."""
    no_retry = {"x-should-retry": "false"}
    if isinstance(e, APIError):
        return e
    if cut_by_shutdown(e):  # not uvicorn's bare 500, which the SDKs retry, paying again
        return APIError(503, "the server shut down before the answer (what the climb cost so "
                        "far is in x-cascade-cost-usd)", type="server_error",
                        code="server_shutting_down", headers=no_retry, trace=trace)
    if isinstance(e, EndpointConfigError):  # the server's config: not the client's to fix
        return APIError(500, f"the service's config cannot serve this: {e}",
                        type="server_error", code="server_config_error", headers=no_retry,
                        trace=trace)
    if isinstance(e, ConfigError):
        return APIError(400, e.detail, param=e.key)
    if isinstance(e, BudgetExceeded):
        return APIError(429, str(e), type="budget_exceeded", code="budget_exceeded",
                        headers=no_retry, trace=trace)
    if isinstance(e, BudgetStoreError):  # the shared store is down: budgets fail closed
        return APIError(503, str(e), type="service_unavailable",
                        code="budget_store_unavailable", headers=no_retry, trace=trace)
    if isinstance(e, DeadlineExceeded):
        return APIError(504, str(e), type="deadline_exceeded", code="deadline_exceeded",
                        headers=no_retry, trace=trace)
    if isinstance(e, NoAnswerError):
        return APIError(502, str(e), type="no_answer", code="no_answer", headers=no_retry,
                        trace=trace)
    if isinstance(e, UnverifiedAnswerError):
        return APIError(422, str(e), type="unverified_answer", code="unverified_answer",
                        headers=no_retry, trace=trace)
    if isinstance(e, CascadeError):
        return APIError(500, f"{type(e).__name__}: {e}", type="server_error",
                        headers=no_retry, trace=trace)
    log.error("unexpected error serving a request", exc_info=e)
    return APIError(500, "internal error (see the server log)", type="server_error",
                    headers=no_retry)


def parse_body(raw: bytes, model: type[_M]) -> _M:
    """Validate a JSON body into ``model``; a bad body is a 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__") or None
        what = f"{loc}: " if loc else ""
        raise APIError(400, f"{what}{err.get('msg', 'invalid')}", param=loc) from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes ([server] max_request_bytes)",
                    code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: a declared length over it is refused before
    anything is read, a chunked body as soon as it grows past it (a 413 either way), so one
    request cannot make the service hold an unbounded body in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)

"""What the OpenAI and Anthropic providers share: SDK error translation, keys, finish reasons.

The OpenAI and Anthropic SDKs share one exception layout (``APITimeoutError`` under
``APIConnectionError``, ``APIStatusError`` with ``status_code`` and ``response``), so one
translator serves both; the caller passes the SDK module. Messages are scrubbed of the API key
(servers echo keys back in 401 bodies) and cut short.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypedDict

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
from cascade.secrets import REDACTED, secret_forms

__all__ = [
    "Structured",
    "Where",
    "attr",
    "billed",
    "count",
    "guarded",
    "is_aiohttp",
    "normalise_finish",
    "parse_retry_after",
    "resolve_api_key",
    "run_instructor",
    "scrub",
    "translate_error",
    "vendor_url",
]

_MAX_DETAIL = 300
MAX_TOKENS = 10**9
"""More tokens than any one reply can hold: a larger usage claim is a malformed reply."""
_QUIET = logging.NullHandler()


class Where(TypedDict):
    """Which provider and model an error belongs to (every ProviderError carries both)."""

    provider: str
    model: str


_FINISH = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "eos": "stop",
    "length": "length",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "content_filter": "content_filter",
    "refusal": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "tool_use": "tool_calls",
}


def normalise_finish(reason: object) -> str | None:
    """One vocabulary for both APIs: stop, length, content_filter, tool_calls (else None)."""
    return _FINISH.get(reason) if isinstance(reason, str) else None


def resolve_api_key(rung: RungConfig, *, default_env: str | None, dummy: str | None) -> str:
    """The key from ``rung.api_key_env`` (or ``default_env``); AuthenticationError names a
    missing variable. ``dummy`` is used when no variable is named at all (local servers)."""
    env = rung.api_key_env or default_env
    if env is None:
        if dummy is None:
            at = f" for base_url {rung.base_url}" if rung.base_url else ""
            raise AuthenticationError(
                f"no api_key_env configured{at}: name the variable holding this endpoint's "
                "key (a vendor's default variable is sent to the vendor's own URL only)",
                provider=rung.provider, model=rung.model)
        return dummy
    key = (os.environ.get(env) or "").strip()
    if not key:
        raise AuthenticationError(
            f"the environment variable {env} is not set (api_key_env); set it to the API key",
            provider=rung.provider, model=rung.model,
        )
    # A header cannot carry these, and the HTTP library's error would quote the key.
    if not key.isascii() or not key.isprintable():
        raise ConfigError(
            f"the environment variable {env} holds a key with a control or non-ASCII "
            "character (not shown); set it to the key alone, e.g. without a line break inside",
            key="api_key_env",
        )
    return key


def vendor_url(base_url: str | None, official: str) -> bool:
    """Whether ``base_url`` is the vendor's own API (None: the SDK's default, which is)."""
    return base_url is None or base_url.rstrip("/").lower() == official


def scrub(text: str, secret: str | None) -> str:
    """Remove ``secret``, in every escaped form, from ``text`` and keep it short for a trace."""
    if secret:
        for form in sorted(secret_forms(secret), key=len, reverse=True):
            text = text.replace(form, REDACTED)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None
                      ) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if 0.0 <= value < float("inf"):
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        value = max(0.0, when.timestamp() - (time.time() if now is None else now))
    return value if 0.0 <= value < float("inf") else None


def _detail(body: object, fallback: str) -> str:
    """The server's own error message, from either SDK's body shape."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    if isinstance(body, str) and body:
        return body
    return fallback


_LOC = re.compile(r"""["']loc["']\s*:\s*[\[(]\s*["']body["']\s*,\s*["']([A-Za-z_][\w-]*)["']""")
"""A FastAPI/pydantic request-validation error's location: ``'loc': ('body', 'field', ...)``."""
_VALIDATION = re.compile(r"validation error|unrecognized request argument|"
                         r"extra (inputs|fields) (are )?not permitted|unknown field", re.I)


_CONTEXT = re.compile(r"context length|context window|context_length_exceeded|"
                      r"context size|prompt is too long|maximum context", re.I)
"""How OpenAI, Anthropic, vLLM and llama.cpp word a prompt longer than the model takes (they
name the field ``messages``, which is not a setting to change)."""


def _code(body: object) -> object:
    inner = body.get("error", body) if isinstance(body, Mapping) else None
    return inner.get("code") if isinstance(inner, Mapping) else None


def _rejected_field(body: object, detail: str) -> str | None:
    """The request field a server says it rejected, from an OpenAI ``param`` or a validation
    error's location (llama-cpp-python answers those with HTTP 500)."""
    inner = body.get("error", body) if isinstance(body, Mapping) else None
    param = inner.get("param") if isinstance(inner, Mapping) else None
    if isinstance(param, str) and param:
        return param
    found = _LOC.search(detail)
    if found:
        return found.group(1)
    if isinstance(body, Mapping) and isinstance(body.get("detail"), list):  # FastAPI's 422
        for item in body["detail"]:
            loc = item.get("loc") if isinstance(item, Mapping) else None
            if isinstance(loc, list) and len(loc) > 1 and loc[0] == "body":
                return str(loc[1])
    return None


_NOT_SENT = frozenset({"ConnectTimeout", "PoolTimeout", "ConnectError", "UnsupportedProtocol",
                       "ProxyError", "ConnectionRefusedError"})
"""Failures before a request byte is sent, by httpx (connect and pool timeouts, connect
errors) or the socket (a refused connection). A read error or a server that closed the
connection (``ReadError``, ``RemoteProtocolError``) came after it."""

_AIOHTTP_NOT_SENT = frozenset({"ClientConnectorError", "ConnectionTimeoutError",
                               "ServerFingerprintMismatch", "ClientHttpProxyError", "InvalidURL",
                               "NonHttpUrlClientError"})
"""aiohttp's failures before a request byte is sent, matched with their subclasses: connect
(refused, DNS, TLS, proxy), connect timeout, certificate pin, proxy CONNECT refused, bad URL.
Every other aiohttp error (``ServerDisconnectedError``, ``ClientPayloadError``, a
``ClientOSError`` reset mid-read, a read timeout) came after the request was written. The
SDKs' aiohttp clients wrap these in httpx classes that do not say which (Anthropic's calls any
``ClientConnectionError`` a ``ConnectError``, OpenAI's a ``ConnectTimeout``), so the aiohttp
error decides."""


def is_aiohttp(cls: type) -> bool:
    """Whether ``cls`` is aiohttp's own (not a package named like it, such as aiohttp_retry)."""
    return cls.__module__ == "aiohttp" or cls.__module__.startswith("aiohttp.")


def _aiohttp_never_sent(exc: BaseException) -> str:
    """The name of ``exc``'s connect-phase class, when it is one of :data:`_AIOHTTP_NOT_SENT`
    (``ClientConnectorError`` subclasses ``ClientOSError``, so match by ancestry), or ""."""
    for cls in type(exc).__mro__:
        if is_aiohttp(cls) and cls.__name__ in _AIOHTTP_NOT_SENT:
            return type(exc).__name__
    return ""


def _never_sent(exc: BaseException) -> str:
    """The name of a connect-phase failure behind ``exc``, or "" (then it may have been
    sent). An aiohttp error in the chain decides: the httpx class it was wrapped in can claim
    a connect error for a server that hung up after reading the request."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc.__cause__ or exc.__context__
    while seen is not None and len(chain) < 6 and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for i, link in enumerate(chain):
        if is_aiohttp(type(link)):
            if not _aiohttp_never_sent(link):
                return ""
            # the httpx wrapper's name, as the httpx client would give it (ConnectTimeout)
            return next((type(w).__name__ for w in chain[:i] if type(w).__name__ in _NOT_SENT),
                        type(link).__name__)
    for link in chain:
        if type(link).__name__ in _NOT_SENT:
            return type(link).__name__
        if isinstance(link, RuntimeError) and "client has been closed" in str(link):
            return "a closed client"  # httpx's: closed before the request was sent
    return ""


def translate_error(exc: BaseException, sdk: ModuleType, *, provider: str, model: str,
                    secret: str | None, setting: Callable[[str], str] | None = None
                    ) -> ProviderError | None:
    """The :class:`ProviderError` for ``exc``, or None when it is not a provider failure.

    ``setting(field)`` names the rung setting to change when the server rejects ``field``.
    """
    kw: dict[str, Any] = {"provider": provider, "model": model}
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, sdk.APITimeoutError):
        unsent = _never_sent(exc)
        if unsent:
            timeout = ProviderTimeout(f"no connection within the timeout ({unsent})", **kw)
            timeout.sent = False
            return timeout
        return ProviderTimeout("the request timed out", **kw)
    if isinstance(exc, sdk.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ProviderError):  # raised by our http client (ReplyTooLarge)
            return cause
        if type(cause).__name__ == "TooManyRedirects":
            return ClientRequestError(f"the server redirects in a loop "
                                      f"({scrub(str(cause), secret)}); check base_url", **kw)
        why = f" ({type(cause).__name__}: {scrub(str(cause), secret)})" if cause else ""
        failed = TransportError(f"connection failed{why}", **kw)
        failed.sent = not _never_sent(exc)
        return failed
    if isinstance(exc, sdk.APIStatusError):
        status: int = exc.status_code
        kw["status_code"] = status
        raw = _detail(exc.body, exc.response.reason_phrase)
        msg = f"HTTP {status}: " + scrub(raw, secret)
        retry_after = parse_retry_after(exc.response.headers)
        if status == 429:
            return RateLimited(msg, retry_after_s=retry_after, **kw)
        if status in (401, 403):
            return AuthenticationError(msg, **kw)
        if status == 408:
            return ProviderTimeout(msg, **kw)
        if status == 409:  # a conflict (OpenAI: a lock timed out); both SDKs retry it
            return ServerError(msg, retry_after_s=retry_after, **kw)
        if _CONTEXT.search(raw) or _code(exc.body) == "context_length_exceeded":
            return ClientRequestError(
                "the prompt (with max_tokens for the reply) does not fit the model's context "
                f"window: shorten it, lower the rung's max_tokens, or use a larger model ({msg})",
                **kw)
        field = _rejected_field(exc.body, raw) if status != 404 else None
        if field is not None and (status < 500 or _VALIDATION.search(raw)):
            fix = setting(field) if setting else "the rung setting that sends it"
            return ClientRequestError(
                f"the server rejected the request field {field!r}; change {fix} ({msg})", **kw)
        if status >= 500:
            return ServerError(msg, retry_after_s=retry_after, **kw)
        if status == 404 and "model" in raw.lower():
            return ClientRequestError(f"{msg}; check the rung's 'model' (the server's "
                                      "/v1/models lists what it serves)", **kw)
        return ClientRequestError(msg, **kw)
    if isinstance(exc, sdk.APIResponseValidationError):
        return MalformedReply(f"reply does not match the API schema: {scrub(str(exc), secret)}",
                              **kw)
    if isinstance(exc, json.JSONDecodeError):
        return MalformedReply(f"reply body is not valid JSON ({exc.msg} at char {exc.pos})", **kw)
    if isinstance(exc, RecursionError):
        return MalformedReply("reply body nests too deeply to read", **kw)
    if isinstance(exc, UnicodeDecodeError):
        return MalformedReply(f"reply body is not UTF-8 text ({exc.reason} at byte {exc.start})",
                              **kw)
    if isinstance(exc, sdk.APIError):
        return TransportError(scrub(str(exc), secret), **kw)
    return None


def billed(err: MalformedReply, reply: object,
           usage: Callable[[object], tuple[int, int] | None] | None) -> MalformedReply:
    """``err`` with the tokens ``reply`` says were billed, when its usage reads (``usage``:
    the wire's reader of a usage object): a malformed 200 is still paid for."""
    if usage is not None and err.billed_tokens is None:
        try:
            err.billed_tokens = usage(attr(reply, "usage"))
        except Exception:  # a usage that does not read bills nothing we can know
            err.billed_tokens = None
    return err


def guarded(create: Callable[..., Awaitable[Any]], sdk: ModuleType, *, secret: str | None,
            where: Where, check: Callable[[Any, Where], object],
            setting: Callable[[str], str] | None = None,
            usage: Callable[[object], tuple[int, int] | None] | None = None
            ) -> Callable[..., Awaitable[Any]]:
    """Wrap an SDK ``create`` so its errors become ours and its reply is checked against the
    wire protocol before anyone (instructor included) touches it; a reply that fails the
    check carries the tokens its ``usage`` says were billed."""

    async def call(**kw: Any) -> Any:
        try:
            reply = await create(**kw)
        except Exception as exc:
            err = translate_error(exc, sdk, secret=secret, setting=setting, **where)
            if err is None:
                raise
        else:
            try:
                check(reply, where)
            except MalformedReply as bad:
                raise billed(bad, reply, usage) from None
            return reply
        # Raised outside the handler: ``from None`` only hides ``__context__``, which would
        # still hold the SDK's exception (its unscrubbed message, its response and request
        # with the key in a header) for anything that walks the chain.
        err.__cause__ = err.__context__ = None
        raise err

    return call


def attr(obj: object, name: str) -> Any:
    """A field of an SDK object built without validation (or of a plain dict), else None.

    The SDKs build replies leniently, so a server can hand us a wrong-typed or missing field;
    callers check types themselves and raise :class:`MalformedReply`.
    """
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def count(value: object) -> int | None:
    """A token count, or None when it is not an integer in [0, MAX_TOKENS]."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Structured:
    """What an instructor call left us: the last raw reply, and the object or why it failed."""

    raw: Any
    parsed: Any
    error: str | None
    total_usage: Any
    """instructor's usage summed over its re-asks, when it kept one."""


async def run_instructor(
    create: Callable[..., Awaitable[Any]],
    *,
    mode: Any,
    provider: Any,
    output_type: type[Any],
    reasks: int,
    kwargs: Mapping[str, Any],
    where: Where,
    secret: str | None = None,
) -> Structured:
    """Ask through instructor, whose ``create`` is ours (so errors are already translated).

    Validation failures come back as a :class:`Structured` with ``parsed=None``: the schema
    verifier rejects the candidate and the cascade escalates, which is the point of a cascade.
    """
    import instructor
    from instructor.core.exceptions import IncompleteOutputException, InstructorRetryException

    # instructor logs every failed validation at ERROR; for a cascade that is routine (the
    # next rung is tried), so keep it off stderr unless the application configures logging.
    logging.getLogger("instructor").addHandler(_QUIET)

    patched = instructor.patch(create=create, mode=mode, provider=provider)
    client = instructor.AsyncInstructor(client=None, create=patched, mode=mode,
                                        provider=provider)
    try:
        parsed, raw = await client.create_with_completion(
            response_model=output_type, max_retries=reasks, **kwargs
        )
    except IncompleteOutputException as e:
        return Structured(raw=e.last_completion, parsed=None, total_usage=None,
                          error="the output was cut at max_tokens before it was complete")
    except InstructorRetryException as e:
        if e.failed_attempts and e.last_completion is not None:
            why = scrub(str(e.failed_attempts[-1].exception), secret)
            return Structured(raw=e.last_completion, parsed=None, error=why,
                              total_usage=e.total_usage)
        cause = e.__cause__
        if isinstance(cause, ProviderError):
            raise cause from None
        raise MalformedReply(
            f"structured reply could not be read ({type(cause).__name__}: "
            f"{scrub(str(cause), secret)})", **where
        ) from None
    return Structured(raw=raw, parsed=_plain(parsed, output_type), error=None,
                      total_usage=getattr(parsed, "_total_usage", None))


def _plain(parsed: Any, output_type: type[Any]) -> Any:
    """instructor hands back a dynamic subclass carrying the raw reply; give the user's type."""
    fields = getattr(output_type, "model_fields", None)
    if type(parsed) is output_type or not isinstance(parsed, output_type) or fields is None:
        return parsed
    return output_type.model_construct(  # already validated: copy the field values over
        _fields_set=set(parsed.model_fields_set),
        **{name: getattr(parsed, name) for name in fields},
    )

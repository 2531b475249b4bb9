"""The exception tree of verified-cascade.

Every error a user can meet is one of these, and each message names what to fix::

    CascadeError
    ├── ConfigError            you configured it wrong (file, key, allowed values)
    │   └── UnknownVerifierError   a verifier name that is neither built in nor installed
    ├── ProviderError          one model call failed (translated once, at the provider boundary)
    │   ├── TransportError         connection refused/reset, timeout: worth a retry or failover
    │   │   └── ProviderTimeout
    │   ├── RateLimited            HTTP 429 (carries ``retry_after_s``)
    │   ├── ServerError            HTTP 5xx and 409 (carries ``retry_after_s`` for 503/529)
    │   ├── ClientRequestError     HTTP 4xx other than 409/429, a rejected request field, a
    │   │   │                      redirect loop: retrying will not help
    │   │   └── AuthenticationError
    │   ├── MalformedReply         the reply is not what the wire protocol promises
    │   │   └── ReplyTooLarge          the decoded body passed ``max_reply_bytes`` (not retried)
    │   └── CircuitOpen            the endpoint's breaker is open; the call was not made
    ├── CacheError             the answer cache is corrupt, locked or unwritable
    ├── BudgetExceeded         a spending cap would be broken
    ├── BudgetStoreError       the shared budget store cannot be used
    ├── DeadlineExceeded       the request's overall ``timeout_s`` ran out
    ├── NoAnswerError          every rung failed or was skipped: nothing to return
    └── UnverifiedAnswerError  the top rung's answer was rejected and the config says raise
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cascade.trace import Answer

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "BudgetStoreError",
    "CacheError",
    "CascadeError",
    "CircuitOpen",
    "ClientRequestError",
    "ConfigError",
    "DeadlineExceeded",
    "EndpointConfigError",
    "MalformedReply",
    "NoAnswerError",
    "ProviderError",
    "ProviderTimeout",
    "RateLimited",
    "ReplyTooLarge",
    "ServerError",
    "TransportError",
    "UnknownVerifierError",
    "UnverifiedAnswerError",
    "UnverifiedWithinBudget",
]


class CascadeError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(CascadeError, ValueError):
    """A configuration value is wrong; the message names the source, the key and what is allowed."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        where = ", ".join(p for p in (source, f"key '{key}'" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.detail = message
        self.source = source
        self.key = key


class EndpointConfigError(ConfigError):
    """A rung's endpoint could not be built from the config as a request climbed (its local
    model file is missing, its key variable holds a control character): the server's
    configuration to fix, not the request's (a service answers 500, not 400)."""


class UnknownVerifierError(ConfigError):
    """A verifier name resolved to nothing; the message lists the known names."""


class ProviderError(CascadeError):
    """A model call failed. ``retryable`` says whether the same call may succeed later."""

    retryable: bool = False
    tries: int = 1
    """Calls made before giving up (set by the retry loop)."""
    billed_tokens: tuple[int, int] | None = None
    """(input, output) tokens the server said it billed for this failed call: a 200 whose
    body breaks the protocol (empty choices, bad logprobs) is paid for all the same."""
    billed_usd: float = 0.0
    """What the failed calls behind this error cost, every try and endpoint (set by the
    caller): spent money the budget and the trace must count although no answer came."""
    sent: bool = True
    """False when the model call itself never went out (a refused connection, a connect or
    pool timeout, ``check_model``'s ``/models`` lookup failing first): nothing can be billed.
    A call that went out and got no usable reply may still be billed."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        status_code: int | None = None,
    ) -> None:
        prefix = f"{provider}:{model}: " if provider or model else ""
        super().__init__(prefix + message)
        self.provider = provider
        self.model = model
        self.status_code = status_code

    @property
    def kind(self) -> str:
        """A stable short name for traces and JSON output."""
        return type(self).__name__


class TransportError(ProviderError):
    """The request or reply did not get through (refused, reset, dropped)."""

    retryable = True


class ProviderTimeout(TransportError):
    """The provider did not answer within the rung's ``timeout_s``."""


class RateLimited(ProviderError):
    """HTTP 429. ``retry_after_s`` is the server's ``Retry-After`` when it sent one."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class ServerError(ProviderError):
    """HTTP 5xx. ``retry_after_s`` is the server's ``Retry-After`` when it sent one (503, 529)."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class ClientRequestError(ProviderError):
    """HTTP 4xx (not 429): the request itself is wrong, retrying will not help."""


class AuthenticationError(ClientRequestError):
    """HTTP 401/403, or the API key environment variable is unset."""


class MalformedReply(ProviderError):
    """The reply broke the wire protocol: invalid JSON, missing fields, empty choices."""

    retryable = True


class ReplyTooLarge(MalformedReply):
    """The decoded reply body passed the rung's ``max_reply_bytes``: the same endpoint would
    send it again, so it is not retried (the cascade fails over)."""

    retryable = False


class CircuitOpen(ProviderError):
    """The endpoint's circuit breaker is open: the call was skipped without waiting."""


class CacheError(CascadeError):
    """The answer cache cannot be used (corrupt, locked, unwritable); names the directory."""


class BudgetExceeded(CascadeError):
    """A spending cap (per request or per key and period) would be exceeded; ``answer`` has
    the trace when a climb had begun (what it paid before the cap stopped it)."""

    def __init__(self, message: str, *, key: str | None = None, spent_usd: float = 0.0,
                 limit_usd: float = 0.0, answer: Answer | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
        self.answer = answer


class BudgetStoreError(CascadeError):
    """The budget store cannot be used (unreadable, locked for too long); names the store."""


class DeadlineExceeded(CascadeError):
    """The request's overall deadline ran out before a verified answer; ``answer`` has the
    trace (a call paid before the deadline cut its verifiers short is in it)."""

    def __init__(self, message: str, answer: Answer | None = None) -> None:
        super().__init__(message)
        self.answer = answer


class NoAnswerError(CascadeError):
    """No rung produced an answer at all (all failed or were skipped); ``answer`` has the trace."""

    def __init__(self, message: str, answer: Answer) -> None:
        super().__init__(message)
        self.answer = answer

    def __reduce__(self) -> tuple[Any, ...]:  # pickled and copied whole (a process pool)
        return type(self), (str(self), self.answer)


class UnverifiedAnswerError(CascadeError):
    """Raised instead of returning ``verified=False`` when ``on_unverified = "raise"``."""

    def __init__(self, message: str, answer: Answer) -> None:
        super().__init__(message)
        self.answer = answer

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.answer)


class UnverifiedWithinBudget(BudgetExceeded, UnverifiedAnswerError):
    """Under ``on_unverified = "raise"``: the answer given was rejected and the rungs above it
    were skipped for the request's cap or the key's budget, so money, not the answers'
    quality, stopped the climb. Caught as either error; the service answers 429."""

    answer: Answer  # always set: the rejected answer given, with the trace

    def __init__(self, message: str, answer: Answer, *, key: str | None = None,
                 spent_usd: float = 0.0, limit_usd: float = 0.0) -> None:
        CascadeError.__init__(self, message)  # both parents' fields, set once here
        self.key, self.spent_usd, self.limit_usd = key, spent_usd, limit_usd
        self.answer = answer

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial(type(self), key=self.key, spent_usd=self.spent_usd,
                                  limit_usd=self.limit_usd), (str(self), self.answer))

"""Retries of one model call: exponential backoff with jitter, ``Retry-After``, a deadline.

Only :class:`~cascade.errors.ProviderError`\\ s with ``retryable=True`` are retried (rate limits,
5xx, transport failures and timeouts, malformed replies); anything else propagates at once.
Sleep, clock and random source are injected so tests run in fake time. The SDKs' own retries are
switched off by the providers, so a call is retried here and only here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from cascade.errors import ProviderError, RateLimited, ServerError

__all__ = ["backoff_delay", "call_with_retry", "retry_delay", "tries_of"]

T = TypeVar("T")

_MAX_EXPONENT = 60  # 2**60 · base is far past any max_delay_s; avoids float overflow.


def backoff_delay(
    attempt: int,
    *,
    base_delay_s: float,
    max_delay_s: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """The pause after the ``attempt``-th failed call (1-based).

    The ceiling is ``min(max_delay_s, base_delay_s · 2**(attempt-1))``; with ``jitter`` j the
    delay is drawn uniformly from ``[ceiling·(1-j), ceiling]`` so that clients which failed
    together do not retry together. ``jitter`` is clamped to [0, 1].
    """
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    ceiling = max(0.0, min(max_delay_s, base_delay_s * (2.0**exponent)))
    j = min(max(jitter, 0.0), 1.0)
    if j == 0.0 or ceiling == 0.0:
        return ceiling
    r = (rng or random).random()
    return ceiling * (1.0 - j * r)


def retry_delay(
    err: ProviderError,
    attempt: int,
    *,
    base_delay_s: float,
    max_delay_s: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float | None:
    """The pause before retrying after ``err``, or None when the server asks for too long.

    A ``Retry-After`` (429, and 503/529 where servers send it too) is honoured as a lower bound.
    When it exceeds ``max_delay_s`` waiting is pointless for an interactive request: the caller
    should give up (and fail over) instead.
    """
    delay = backoff_delay(
        attempt, base_delay_s=base_delay_s, max_delay_s=max_delay_s, jitter=jitter, rng=rng
    )
    retry_after = _retry_after(err)
    if retry_after is not None:
        retry_after = max(0.0, retry_after)
        if retry_after > max_delay_s:
            return None
        delay = max(delay, retry_after)
    return delay


def _retry_after(err: ProviderError) -> float | None:
    """The server's requested pause, carried by rate limits and server errors."""
    if isinstance(err, (RateLimited, ServerError)):
        return err.retry_after_s
    return None


def tries_of(err: BaseException) -> int:
    """How many calls :func:`call_with_retry` made before it raised ``err`` (1 if unknown)."""
    tries = getattr(err, "tries", 1)
    return tries if isinstance(tries, int) else 1


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    *,
    max_attempts: int,
    base_delay_s: float,
    max_delay_s: float,
    jitter: float,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: random.Random | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[int, ProviderError, float], None] | None = None,
) -> tuple[T, int]:
    """Await ``fn()`` until it succeeds; return its result and the number of calls made.

    At least one call is always made (``max_attempts`` below 1 counts as 1). Gives up, raising
    the last error with ``err.tries`` set and a note saying why, when the error is not
    retryable, the attempts are used up, ``Retry-After`` exceeds ``max_delay_s``, or the pause
    would not end before ``deadline`` (a ``clock()`` reading): it never sleeps past the deadline.
    ``on_retry(attempt, err, delay)`` is called before each pause, e.g. to record it in a trace.
    Errors that are not :class:`ProviderError` (bugs, cancellation) propagate untouched.
    """
    attempts = max(1, max_attempts)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn(), attempt
        except ProviderError as err:
            delay, why = _next_pause(err, attempt, attempts, base_delay_s, max_delay_s, jitter,
                                     rng, None if deadline is None else deadline - clock())
            if delay is None:
                err.tries = attempt
                err.add_note(f"gave up after {attempt} {'try' if attempt == 1 else 'tries'}: "
                             f"{why}")
                raise
            failure, pause = err, delay
        # Sleep outside the except block, so the failure is not the context of what comes next.
        if on_retry is not None:
            on_retry(attempt, failure, pause)
        await sleep(pause)


def _next_pause(err: ProviderError, attempt: int, attempts: int, base_delay_s: float,
                max_delay_s: float, jitter: float, rng: random.Random | None,
                remaining: float | None) -> tuple[float | None, str]:
    """The pause before the next try, or None and the reason to give up."""
    if not err.retryable:
        return None, f"{err.kind} is not retryable"
    if attempt >= attempts:
        return None, f"max_attempts={attempts} reached"
    delay = retry_delay(err, attempt, base_delay_s=base_delay_s, max_delay_s=max_delay_s,
                        jitter=jitter, rng=rng)
    if delay is None:
        return None, f"Retry-After {_retry_after(err)}s exceeds max_delay_s={max_delay_s}"
    if remaining is not None and delay >= remaining:
        return None, (f"a {delay:.2f}s pause would pass the deadline "
                      f"({max(remaining, 0.0):.2f}s left)")
    return delay, ""

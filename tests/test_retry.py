"""Retries in fake time: what is retried, how long it waits, when it gives up."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascade.errors import (
    AuthenticationError,
    CircuitOpen,
    ClientRequestError,
    MalformedReply,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    ServerError,
    TransportError,
)
from cascade.retry import backoff_delay, call_with_retry, retry_delay, tries_of


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def failing(errors: list[BaseException], result: str = "ok") -> tuple[
    Callable[[], Awaitable[str]], list[int]
]:
    """A call that raises ``errors`` in turn, then returns ``result``; counts its calls."""
    calls = [0]

    async def fn() -> str:
        calls[0] += 1
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


KW: dict[str, Any] = {"base_delay_s": 0.5, "max_delay_s": 20.0, "jitter": 0.0}


@pytest.mark.anyio
@pytest.mark.parametrize("err", [
    RateLimited("429"), ServerError("503"), TransportError("reset"), ProviderTimeout("slow"),
    MalformedReply("garbage"),
])
async def test_retryable_errors_are_retried_with_exponential_backoff(err: ProviderError) -> None:
    t = FakeTime()
    fn, calls = failing([err, err, err])
    result, tries = await call_with_retry(fn, max_attempts=4, sleep=t.sleep, clock=t.clock, **KW)
    assert (result, tries, calls[0]) == ("ok", 4, 4)
    assert t.sleeps == [0.5, 1.0, 2.0]


@pytest.mark.anyio
@pytest.mark.parametrize("err", [
    ClientRequestError("400"), AuthenticationError("401"), CircuitOpen("open"),
])
async def test_non_retryable_errors_raise_at_once(err: ProviderError) -> None:
    t = FakeTime()
    fn, calls = failing([err])
    with pytest.raises(type(err)) as info:
        await call_with_retry(fn, max_attempts=5, sleep=t.sleep, clock=t.clock, **KW)
    assert info.value is err
    assert calls[0] == 1 and t.sleeps == []
    assert tries_of(info.value) == 1
    assert any("not retryable" in n for n in info.value.__notes__)


@pytest.mark.anyio
async def test_gives_up_after_max_attempts_with_tries_recorded() -> None:
    t = FakeTime()
    errs: list[BaseException] = [ServerError(f"500 #{i}") for i in range(5)]
    last = errs[2]
    fn, calls = failing(errs)
    with pytest.raises(ServerError) as info:
        await call_with_retry(fn, max_attempts=3, sleep=t.sleep, clock=t.clock, **KW)
    assert info.value is last
    assert calls[0] == 3 and tries_of(info.value) == 3
    assert len(t.sleeps) == 2
    assert "max_attempts=3" in info.value.__notes__[-1]


@pytest.mark.anyio
async def test_the_original_cause_is_kept() -> None:
    t = FakeTime()
    err = TransportError("reset")
    err.__cause__ = ConnectionResetError("peer reset")
    fn, _ = failing([err])
    with pytest.raises(TransportError) as info:
        await call_with_retry(fn, max_attempts=1, sleep=t.sleep, clock=t.clock, **KW)
    assert isinstance(info.value.__cause__, ConnectionResetError)


@pytest.mark.anyio
async def test_zero_attempts_still_makes_one_call() -> None:
    t = FakeTime()
    fn, calls = failing([])
    assert await call_with_retry(fn, max_attempts=0, sleep=t.sleep, clock=t.clock, **KW) == (
        "ok", 1)
    assert calls[0] == 1


@pytest.mark.anyio
async def test_retry_after_is_a_lower_bound() -> None:
    t = FakeTime()
    fn, _ = failing([RateLimited("429", retry_after_s=7.0), RateLimited("429", retry_after_s=0.1)])
    _, tries = await call_with_retry(fn, max_attempts=3, sleep=t.sleep, clock=t.clock, **KW)
    assert tries == 3
    assert t.sleeps == [7.0, 1.0]


@pytest.mark.anyio
async def test_retry_after_beyond_max_delay_gives_up_without_sleeping() -> None:
    t = FakeTime()
    fn, calls = failing([RateLimited("429", retry_after_s=120.0)])
    with pytest.raises(RateLimited) as info:
        await call_with_retry(fn, max_attempts=5, sleep=t.sleep, clock=t.clock, **KW)
    assert calls[0] == 1 and t.sleeps == []
    assert "Retry-After 120.0s exceeds max_delay_s=20.0" in info.value.__notes__[-1]


@pytest.mark.anyio
async def test_never_sleeps_past_the_deadline() -> None:
    t = FakeTime()
    fn, calls = failing([ServerError("500")] * 10)
    # pauses 0.5, 1, 2 fit in 4s (3.5s); the next, 4s, would end past the deadline.
    with pytest.raises(ServerError) as info:
        await call_with_retry(fn, max_attempts=10, sleep=t.sleep, clock=t.clock,
                              deadline=t.now + 4.0, **KW)
    assert t.sleeps == [0.5, 1.0, 2.0]
    assert calls[0] == 4 and tries_of(info.value) == 4
    assert t.now <= 1004.0
    assert "deadline" in info.value.__notes__[-1]


@pytest.mark.anyio
async def test_retry_after_past_the_deadline_gives_up() -> None:
    t = FakeTime()
    fn, calls = failing([RateLimited("429", retry_after_s=5.0)])
    with pytest.raises(RateLimited):
        await call_with_retry(fn, max_attempts=3, sleep=t.sleep, clock=t.clock,
                              deadline=t.now + 3.0, **KW)
    assert calls[0] == 1 and t.sleeps == []


@pytest.mark.anyio
async def test_on_retry_sees_each_pause() -> None:
    t = FakeTime()
    seen: list[tuple[int, str, float]] = []
    fn, _ = failing([ServerError("a"), TransportError("b")])
    await call_with_retry(fn, max_attempts=3, sleep=t.sleep, clock=t.clock,
                          on_retry=lambda n, e, d: seen.append((n, e.kind, d)), **KW)
    assert seen == [(1, "ServerError", 0.5), (2, "TransportError", 1.0)]


@pytest.mark.anyio
async def test_other_exceptions_propagate_untouched() -> None:
    t = FakeTime()
    fn, calls = failing([KeyError("bug")])
    with pytest.raises(KeyError):
        await call_with_retry(fn, max_attempts=3, sleep=t.sleep, clock=t.clock, **KW)
    assert calls[0] == 1 and t.sleeps == []


@pytest.mark.anyio
async def test_jitter_is_seeded_and_spreads_delays() -> None:
    t = FakeTime()
    fn, _ = failing([ServerError("x")] * 3)
    await call_with_retry(fn, max_attempts=4, sleep=t.sleep, clock=t.clock,
                          rng=random.Random(7), base_delay_s=1.0, max_delay_s=20.0, jitter=0.5)
    again = [backoff_delay(n, base_delay_s=1.0, max_delay_s=20.0, jitter=0.5, rng=r)
             for r in [random.Random(7)] for n in (1, 2, 3)]
    assert t.sleeps == again
    assert all(0.5 * c <= d <= c for d, c in zip(t.sleeps, [1.0, 2.0, 4.0], strict=True))
    assert t.sleeps != [1.0, 2.0, 4.0]


@pytest.mark.anyio
async def test_real_anyio_sleep_is_the_default() -> None:
    fn, _ = failing([ServerError("x")])
    result, tries = await call_with_retry(fn, max_attempts=2, base_delay_s=0.001,
                                          max_delay_s=0.01, jitter=0.0)
    assert (result, tries) == ("ok", 2)


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=1000.0),
    jitter=st.floats(min_value=-1.0, max_value=2.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_delay_stays_within_its_band(attempt: int, base: float, cap: float,
                                             jitter: float, seed: int) -> None:
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 60))
    d = backoff_delay(attempt, base_delay_s=base, max_delay_s=cap, jitter=jitter,
                      rng=random.Random(seed))
    j = min(max(jitter, 0.0), 1.0)
    assert ceiling * (1 - j) - 1e-9 <= d <= ceiling + 1e-9
    assert 0.0 <= d <= cap + 1e-9


@given(
    attempt=st.integers(min_value=1, max_value=50),
    base=st.floats(min_value=0.001, max_value=10.0),
    cap=st.floats(min_value=0.001, max_value=100.0),
)
def test_backoff_without_jitter_never_shrinks(attempt: int, base: float, cap: float) -> None:
    kw: dict[str, Any] = {"base_delay_s": base, "max_delay_s": cap, "jitter": 0.0}
    assert backoff_delay(attempt + 1, **kw) >= backoff_delay(attempt, **kw)


@given(
    attempt=st.integers(min_value=1, max_value=50),
    retry_after=st.floats(min_value=0.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=50.0),
)
def test_retry_delay_honours_retry_after_or_gives_up(attempt: int, retry_after: float,
                                                     cap: float) -> None:
    d = retry_delay(RateLimited("429", retry_after_s=retry_after), attempt,
                    base_delay_s=0.5, max_delay_s=cap, jitter=0.5, rng=random.Random(0))
    if retry_after > cap:
        assert d is None
    else:
        assert d is not None and retry_after <= d <= cap

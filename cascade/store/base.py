"""The state the engine shares between requests, as async protocols.

One :class:`Store` bundles it: the verified-answer cache, the per-key budgets, the circuit
breakers, observed latencies, and named counters and flags (shadow checks, drift alarms). The
local store keeps today's behaviour (diskcache, memory/SQLite budgets, per-process breakers);
a Redis store shares all of it across workers. The engine only ever talks to these protocols.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from cascade.budget import Reservation
from cascade.trace import Answer

__all__ = ["AsyncBreakers", "AsyncBudgetStore", "AsyncCache", "Counters", "Latency", "Store"]


class AsyncCache(Protocol):
    """Verified answers by cache key. A damaged entry reads as a miss; unverified answers are
    refused by ``aset``."""

    async def aget(self, key: str) -> Answer | None: ...

    async def aset(self, key: str, answer: Answer) -> None:
        """Store a verified answer; raises :class:`cascade.errors.CacheError` on failure."""
        ...

    async def aclose(self) -> None: ...


class AsyncBudgetStore(Protocol):
    """Spending per key and period: reserve the estimate, settle the actual, atomically."""

    async def areserve(self, key: str, amount_usd: float, limit_usd: float,
                       period_s: float) -> Reservation:
        """Set ``amount_usd`` aside or raise :class:`cascade.errors.BudgetExceeded`."""
        ...

    async def asettle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reservation with what was spent. Idempotent."""
        ...

    async def arelease(self, reservation: Reservation) -> None:
        """Drop the reservation: nothing was spent. Idempotent."""
        ...

    async def aspent(self, key: str, period_s: float) -> float:
        """Settled spending of ``key`` in the current window."""
        ...


class AsyncBreakers(Protocol):
    """Circuit breakers per endpoint string (``RungConfig.endpoint``)."""

    async def acheck(self, endpoint: str) -> bool:
        """Let a call through (True when it is the half-open probe) or raise CircuitOpen."""
        ...

    async def arecord(self, endpoint: str, err: BaseException | None) -> None:
        """Record a call's outcome: the exception it ended with, or None for success."""
        ...

    async def asnapshot(self) -> dict[str, dict[str, Any]]:
        """State per endpoint, for ``health()`` and ``/healthz``."""
        ...


class Latency(Protocol):
    """Observed call latency per endpoint (an exponentially weighted mean)."""

    async def aobserve(self, endpoint: str, seconds: float, *, failed: bool = False) -> None: ...

    def mean_s(self, endpoint: str) -> float | None:
        """The latest known mean (no I/O on the hot path; a shared store refreshes it)."""
        ...

    def snapshot(self) -> dict[str, dict[str, Any]]: ...


class Counters(Protocol):
    """Named integer counters and string flags (shadow samples, drift alarms)."""

    async def aincr(self, name: str, fields: Mapping[str, int]) -> dict[str, int]:
        """Add to several fields of counter ``name`` at once; returns the new values."""
        ...

    async def aget(self, name: str) -> dict[str, int]: ...

    async def aset_flag(self, name: str, value: str | None) -> None:
        """Set (or with None, clear) a flag shared by every worker."""
        ...

    async def aget_flag(self, name: str) -> str | None: ...

    async def aswap_flag(self, name: str, expected: str | None, value: str | None) -> bool:
        """Set (or clear) the flag only if it still holds ``expected``, atomically; False when
        another writer changed it first. A read-modify-write shared by many workers (the drift
        test's state) needs it, or concurrent updates overwrite each other."""
        ...


class Store(Protocol):
    """Everything shared between requests, one object per Cascade."""

    @property
    def cache(self) -> AsyncCache | None:
        """None when the cache is disabled."""
        ...

    @property
    def budgets(self) -> AsyncBudgetStore: ...

    @property
    def breakers(self) -> AsyncBreakers: ...

    @property
    def latency(self) -> Latency: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def shared(self) -> bool:
        """True when the state is shared with other processes (a Redis store)."""
        ...

    def status(self) -> dict[str, Any]:
        """For health checks: what the store is and whether it works now (no I/O)."""
        ...

    async def asettle_kept(self) -> None:
        """Record the settles kept while a shared store was down, if it answers now (nothing
        to do for a local store). Requests do it as they reserve; an idle process needs a
        nudge, or its kept spend waits and the budget overspends meanwhile."""
        ...

    async def aclose(self) -> None: ...

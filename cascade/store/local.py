"""The store of one process: today's disk cache, memory/SQLite budgets, process-wide breakers.

Each piece wraps the existing synchronous class behind the async protocol of
:mod:`cascade.store.base`; blocking I/O (diskcache, SQLite) runs in a worker thread so a locked
database never stalls the event loop, and settling money is shielded from cancellation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from cascade.breaker import CircuitBreakers, breakers_for
from cascade.budget import BudgetStore, Reservation, default_store
from cascade.cache import AnswerCache
from cascade.config import CascadeConfig
from cascade.trace import Answer

__all__ = ["LocalBreakers", "LocalBudgets", "LocalCache", "LocalCounters", "LocalLatency",
           "LocalStore", "process_latency"]


class LocalCache:
    """:class:`AnswerCache` (diskcache) behind the async protocol."""

    def __init__(self, cache: AnswerCache, *, owned: bool) -> None:
        self.sync = cache
        self._owned = owned

    async def aget(self, key: str) -> Answer | None:
        return await anyio.to_thread.run_sync(self.sync.get, key)

    async def aset(self, key: str, answer: Answer) -> None:
        await anyio.to_thread.run_sync(self.sync.set, key, answer)

    async def aclose(self) -> None:
        if self._owned:
            self.sync.close()


class LocalBudgets:
    """A :class:`BudgetStore` (memory or SQLite) behind the async protocol."""

    def __init__(self, store: BudgetStore) -> None:
        self.sync = store

    async def areserve(self, key: str, amount_usd: float, limit_usd: float,
                       period_s: float) -> Reservation:
        if not self.sync.blocking:
            return self.sync.reserve(key, amount_usd, limit_usd, period_s)
        # The worker thread reserves even if the request is cancelled meanwhile (a busy file):
        # take its reservation, then give it back if the request was cancelled, rather than
        # leave it holding money until its window ends.
        with anyio.CancelScope(shield=True):
            res = await anyio.to_thread.run_sync(self.sync.reserve, key, amount_usd,
                                                 limit_usd, period_s)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await self.arelease(res)
            raise
        return res

    async def asettle(self, reservation: Reservation, actual_usd: float) -> None:
        if not self.sync.blocking:
            self.sync.settle(reservation, actual_usd)
            return
        # Shielded: money already spent must be recorded even if the request is cancelled.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.sync.settle, reservation, actual_usd)

    async def arelease(self, reservation: Reservation) -> None:
        if not self.sync.blocking:
            self.sync.release(reservation)
            return
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.sync.release, reservation)

    async def aspent(self, key: str, period_s: float) -> float:
        if not self.sync.blocking:
            return self.sync.spent(key, period_s)
        return await anyio.to_thread.run_sync(self.sync.spent, key, period_s)


class LocalBreakers:
    """Process-wide :class:`CircuitBreakers` behind the async protocol (no I/O)."""

    def __init__(self, breakers: CircuitBreakers) -> None:
        self.sync = breakers

    async def acheck(self, endpoint: str) -> bool:
        return self.sync.check(endpoint)

    async def arecord(self, endpoint: str, err: BaseException | None) -> None:
        self.sync.record(endpoint, err)

    async def asnapshot(self) -> dict[str, dict[str, Any]]:
        return self.sync.snapshot()


@dataclass
class _Mean:
    """An exponentially weighted mean of an endpoint's observed call latency."""

    mean_s: float = 0.0
    calls: int = 0
    failures: int = 0


class LocalLatency:
    """Observed latency per endpoint, shared by every Cascade of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_endpoint: dict[str, _Mean] = {}

    async def aobserve(self, endpoint: str, seconds: float, *, failed: bool = False) -> None:
        self.observe(endpoint, seconds, failed=failed)

    def observe(self, endpoint: str, seconds: float, *, failed: bool = False) -> None:
        with self._lock:
            m = self._by_endpoint.setdefault(endpoint, _Mean())
            if failed:
                m.failures += 1
                return
            m.calls += 1
            a = 0.2 if m.calls > 1 else 1.0
            m.mean_s += a * (seconds - m.mean_s)

    def mean_s(self, endpoint: str) -> float | None:
        m = self._by_endpoint.get(endpoint)
        return None if m is None or m.calls == 0 else m.mean_s

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {ep: {"calls": m.calls, "failures": m.failures,
                         "mean_latency_ms": round(m.mean_s * 1000, 3)}
                    for ep, m in self._by_endpoint.items()}


class LocalCounters:
    """Named counters and flags in this process's memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._flags: dict[str, str] = {}

    async def aincr(self, name: str, fields: Mapping[str, int]) -> dict[str, int]:
        with self._lock:
            c = self._counts.setdefault(name, {})
            for k, by in fields.items():
                c[k] = c.get(k, 0) + int(by)
            return dict(c)

    async def aget(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.get(name, {}))

    async def aset_flag(self, name: str, value: str | None) -> None:
        with self._lock:
            self._set_flag(name, value)

    def _set_flag(self, name: str, value: str | None) -> None:
        """Set the flag, or clear it (None); the caller holds the lock."""
        if value is None:
            self._flags.pop(name, None)
        else:
            self._flags[name] = value

    async def aget_flag(self, name: str) -> str | None:
        with self._lock:
            return self._flags.get(name)

    async def aswap_flag(self, name: str, expected: str | None, value: str | None) -> bool:
        with self._lock:
            if self._flags.get(name) != expected:
                return False
            self._set_flag(name, value)
            return True

    def remember_counts(self, name: str, counts: Mapping[str, int]) -> None:
        """Overwrite ``name``'s counts with what the shared store said (a shared store's
        fallback starts from its last known state, not from nothing)."""
        with self._lock:
            self._counts[name] = dict(counts)

    def remember_flag(self, name: str, value: str | None) -> None:
        """Overwrite the flag with what the shared store said (None: it holds none)."""
        with self._lock:
            self._set_flag(name, value)


_PROCESS_LATENCY = LocalLatency()
_PROCESS_COUNTERS = LocalCounters()


def process_latency() -> LocalLatency:
    """The latency figures every local store of this process shares (for ``health()``)."""
    return _PROCESS_LATENCY


class LocalStore:
    """Everything a Cascade shares between requests, within this process (and host)."""

    shared = False

    def __init__(self, config: CascadeConfig, *, cache: AnswerCache | None = None,
                 budget_store: BudgetStore | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        c = config.cache
        if not c.enabled:
            self.cache: LocalCache | None = None
        elif cache is not None:
            self.cache = LocalCache(cache, owned=False)
        else:
            self.cache = LocalCache(AnswerCache(c.directory, ttl_s=c.ttl_s,
                                                size_limit_mb=c.size_limit_mb), owned=True)
        self.budgets = LocalBudgets(budget_store if budget_store is not None else default_store())
        b = config.breaker
        # Process-wide breakers, unless a clock is injected (tests in fake time get their own).
        self.breakers = LocalBreakers(
            breakers_for(b) if clock is None
            else CircuitBreakers(b.failure_threshold, b.cooldown_s, clock=clock))
        self.latency = _PROCESS_LATENCY
        self.counters = _PROCESS_COUNTERS

    def status(self) -> dict[str, Any]:
        return {"shared": False}

    async def asettle_kept(self) -> None:
        return None  # nothing is kept: the local budget store is always there

    async def aclose(self) -> None:
        if self.cache is not None:
            await self.cache.aclose()

    def close(self) -> None:
        """Sync close for the facade's ``close()`` (only the disk cache holds a resource)."""
        if self.cache is not None and self.cache._owned:
            self.cache.sync.close()

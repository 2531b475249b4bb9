"""Calling one rung: its endpoints in order of preference, each behind a circuit breaker and
with retries; latency observed for the deadline gate and for load-aware endpoint choice.

Nothing here decides whether an answer is good: that is the verifiers' and the policy's job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import anyio

from cascade.config import CascadeConfig, RungConfig
from cascade.errors import CircuitOpen, ProviderError, ProviderTimeout
from cascade.providers.base import Completion, ModelCall, Provider
from cascade.retry import call_with_retry
from cascade.store.base import Store

__all__ = ["CallResult", "EndpointCaller", "short"]


def short(e: BaseException, limit: int = 300) -> str:
    """An error's text, cut to one line's worth for traces."""
    s = str(e)
    return s if len(s) <= limit else s[: limit - 1] + "…"


@dataclass
class CallResult:
    """A rung's reply, the endpoint that gave it, and what it took to get it."""

    completion: Completion
    endpoint: RungConfig
    tries: int
    failover_errors: list[str] = field(default_factory=list)
    choice: str | None = None
    """Why this endpoint went first, when the order was load-aware."""


class _InFlight:
    """Requests in flight per endpoint, in this process (the load-aware choice reads it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, endpoint: str, n: int) -> None:
        with self._lock:
            self.counts[endpoint] = self.counts.get(endpoint, 0) + n


_IN_FLIGHT = _InFlight()


class EndpointCaller:
    """Makes a rung's call through breakers, retries and failover (one per Cascade)."""

    def __init__(self, config: CascadeConfig, store: Store,
                 provider: Callable[[RungConfig], Provider],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self._provider = provider
        self._clock = clock

    def expected_s(self, rung: RungConfig) -> float | None:
        """How long the rung's first endpoint usually takes (None before any call)."""
        return self.store.latency.mean_s(rung.endpoint)

    def order(self, rung: RungConfig) -> tuple[list[RungConfig], str | None]:
        """The rung's endpoints in the order to try them.

        Fallbacks serving the *same model* are equivalent: among those, the one with fewer
        requests in flight, then the lower observed latency, goes first. Other fallbacks keep
        their configured order after them.
        """
        eps = [rung, *rung.fallbacks]
        same = [e for e in eps if e.model == rung.model]
        if len(same) < 2:
            return eps, None

        def load(e: RungConfig) -> tuple[int, float]:
            # An endpoint not yet timed ranks as fast: it gets its chance to be measured.
            lat = self.store.latency.mean_s(e.endpoint)
            return (_IN_FLIGHT.counts.get(e.endpoint, 0), 0.0 if lat is None else lat)

        ranked = sorted(same, key=load)  # stable: ties keep the configured order
        if ranked[0] is rung:
            return [*ranked, *(e for e in eps if e.model != rung.model)], None
        n, lat = load(ranked[0])
        n0, lat0 = load(rung)
        why = (f"load-aware: {ranked[0].base_url or ranked[0].provider} first "
               f"({n} in flight, {_ms(lat)}) over {rung.base_url or rung.provider} "
               f"({n0} in flight, {_ms(lat0)})")
        return [*ranked, *(e for e in eps if e.model != rung.model)], why

    async def call(self, call: ModelCall, rung: RungConfig, deadline: float | None
                   ) -> CallResult:
        """Call a rung, failing over to its other endpoints in order."""
        errors: list[str] = []
        tries = 0
        last: ProviderError | None = None
        endpoints, why = self.order(rung)
        for ep in endpoints:
            try:
                ep_call = call if ep.model == call.model else replace(call, model=ep.model)
                c, n = await self._call_endpoint(ep_call, ep, deadline)
                return CallResult(c, ep, tries + n, errors, why)
            except ProviderError as e:
                tries += 0 if isinstance(e, CircuitOpen) else e.tries
                errors.append(f"{ep.provider}:{ep.model}: {type(e).__name__}: {short(e)}")
                last = e
        assert last is not None
        last.tries = tries
        last.failover_errors = errors  # type: ignore[attr-defined]
        raise last

    async def _call_endpoint(self, call: ModelCall, rung: RungConfig, deadline: float | None
                             ) -> tuple[Completion, int]:
        """One endpoint: breaker check, retries with backoff, breaker and latency bookkeeping."""
        await self.store.breakers.acheck(rung.endpoint)
        provider = self._provider(rung)
        retry = self.config.retry
        attempts = retry.max_attempts if rung.max_retries is None else rung.max_retries + 1
        latency = self.store.latency

        async def once() -> Completion:
            t0 = self._clock()
            timeout = call.timeout_s
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - self._clock()))
            # The SDK's timeout bounds each read, not the whole call: a server trickling
            # bytes could hold it far longer, so the whole call is bounded here too.
            try:
                with anyio.fail_after(timeout + 0.05):
                    c = await provider.complete(
                        call if timeout == call.timeout_s else replace(call, timeout_s=timeout))
            except TimeoutError:
                raise ProviderTimeout(f"no complete reply within {timeout:g}s",
                                      provider=rung.provider, model=call.model) from None
            await latency.aobserve(rung.endpoint, self._clock() - t0)
            return c

        err: BaseException | None = None
        _IN_FLIGHT.add(rung.endpoint, 1)
        try:
            return await call_with_retry(
                once, max_attempts=max(1, attempts), base_delay_s=retry.base_delay_s,
                max_delay_s=retry.max_delay_s, jitter=retry.jitter, deadline=deadline,
                clock=self._clock,
            )
        except ProviderError as e:
            await latency.aobserve(rung.endpoint, 0.0, failed=True)
            err = e
            raise
        except BaseException as e:  # cancelled mid-call: tells nothing about the endpoint
            err = e
            raise
        finally:
            _IN_FLIGHT.add(rung.endpoint, -1)
            with anyio.CancelScope(shield=True):
                await self.store.breakers.arecord(rung.endpoint, err)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds else "not timed yet"


def endpoints_of(config: CascadeConfig) -> list[tuple[int, RungConfig, RungConfig]]:
    """Every endpoint of the ladder in climbing order: (rung index, rung, endpoint), the rung
    itself first, then its fallbacks (for health and probes)."""
    return [(i, rung, ep) for i, rung in enumerate(config.rungs) for ep in (rung, *rung.fallbacks)]

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

from cascade.breaker import NoVerdict
from cascade.config import CascadeConfig, RetryConfig, RungConfig
from cascade.errors import (
    CircuitOpen,
    ConfigError,
    MalformedReply,
    ProviderError,
    ProviderTimeout,
    TransportError,
)
from cascade.providers.base import Completion, ModelCall, Provider
from cascade.retry import call_with_retry
from cascade.store.base import Store

__all__ = ["CallResult", "EndpointCaller", "short"]


def _maybe_billed(e: ProviderError) -> bool:
    """Whether a failed try with no usage may still be billed: it went out, and either no
    reply came (a timeout or a connection dropped after the send; a server's own 408 says it
    never took the request) or a 2xx came without its usage (or too large to read)."""
    if not e.sent:
        return False
    if isinstance(e, TransportError):
        return e.status_code is None
    return isinstance(e, MalformedReply) and (e.status_code is None
                                              or 200 <= e.status_code < 300)


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
    failed_usd: float = 0.0
    """What earlier tries that failed but were billed cost (a malformed 200 is paid for)."""

    @property
    def cost_usd(self) -> float:
        """Everything this call cost: the reply, at the endpoint that gave it, and the billed
        tries that failed before it."""
        c = self.completion
        return self.endpoint.cost_usd(c.input_tokens, c.output_tokens) + self.failed_usd


class _InFlight:
    """Requests in flight per endpoint, in this process (the load-aware choice reads it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, endpoint: str, n: int) -> None:
        with self._lock:
            self.counts[endpoint] = self.counts.get(endpoint, 0) + n


_IN_FLIGHT = _InFlight()

_REMEASURE_S = 60.0
"""An equivalent endpoint not tried for this long ranks as untimed once more: its latency is
known only from calls made to it, so one seen slow would otherwise never be seen to recover."""

_FAIR_CHANCE = 2.0
"""A call the request's deadline cut below the rung's ``timeout_s`` that then timed out counts
against the endpoint only if it was given this many times the endpoint's observed mean latency
(a healthy endpoint answers well within that); with less it was the caller's limit, not the
endpoint failing, and tells the breaker nothing."""

_LAST_TRIED: dict[str, float] = {}
"""When (a reading of the caller's clock) each endpoint was last called, in this process."""


def equivalent(a: RungConfig, b: RungConfig) -> bool:
    """Whether two endpoints of a rung are interchangeable: the same model, answering under the
    same settings, at the same price. Only these may be reordered by load; a dearer fallback,
    or one asking for other tokens, stays where the config put it."""
    return (a.identity() | {"provider": "", "base_url": None}
            == b.identity() | {"provider": "", "base_url": None}
            and (a.input_usd_per_mtok, a.output_usd_per_mtok, a.price)
            == (b.input_usd_per_mtok, b.output_usd_per_mtok, b.price))


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

        Fallbacks :func:`equivalent` to the rung are interchangeable: among those, the one
        with fewer requests in flight, then the lower observed latency, goes first. One not
        yet timed, or not tried for ``_REMEASURE_S``, ranks as fast: it gets its chance to be
        measured. Other fallbacks keep their configured order after them.
        """
        eps = [rung, *rung.fallbacks]
        same = [e for e in eps if e is rung or equivalent(e, rung)]
        if len(same) < 2:
            return eps, None
        now = self._clock()

        def latency(e: RungConfig) -> tuple[float | None, bool]:
            """(the latency it ranks by, whether that is a stale figure set aside)."""
            lat = self.store.latency.mean_s(e.endpoint)
            last = _LAST_TRIED.get(e.endpoint)
            stale = lat is not None and (last is None or not 0.0 <= now - last < _REMEASURE_S)
            return (None, True) if stale else (lat, False)

        def load(e: RungConfig) -> tuple[int, float]:
            lat = latency(e)[0]
            return (_IN_FLIGHT.counts.get(e.endpoint, 0), 0.0 if lat is None else lat)

        ranked = sorted(same, key=load)  # stable: ties keep the configured order
        rest = [e for e in eps if not any(e is x for x in same)]
        if ranked[0] is rung:
            return [*ranked, *rest], None

        def said(e: RungConfig) -> str:
            lat, stale = latency(e)
            timing = "re-measuring" if stale else _ms(lat or 0.0)
            return f"{_IN_FLIGHT.counts.get(e.endpoint, 0)} in flight, {timing}"

        why = (f"load-aware: {ranked[0].base_url or ranked[0].provider} first "
               f"({said(ranked[0])}) over {rung.base_url or rung.provider} ({said(rung)})")
        return [*ranked, *rest], why

    async def call(self, call: ModelCall, rung: RungConfig, deadline: float | None, *,
                   unanswered: list[RungConfig] | None = None,
                   retry: RetryConfig | None = None) -> CallResult:
        """Call a rung, failing over to its other endpoints in order, with ``retry`` (the
        request's ladder's ``[retry]``: a per-call ``config=`` has its own; the Cascade's by
        default).

        ``unanswered`` gets the endpoint of every try that went out and never got its reply
        back (timed out, or cancelled while in flight): the provider may bill such a call,
        so a budget keeps its estimate (see :class:`cascade.climb.Climb`)."""
        errors: list[str] = []
        tries = 0
        failed_usd = 0.0  # billed tries that failed, on every endpoint tried
        unanswered = [] if unanswered is None else unanswered
        last: ProviderError | None = None
        endpoints, why = self.order(rung)
        for ep in endpoints:
            try:
                ep_call = call if ep.model == call.model else replace(call, model=ep.model)
                c, n, wasted = await self._call_endpoint(ep_call, ep, deadline, unanswered,
                                                         retry or self.config.retry)
                return CallResult(c, ep, tries + n, errors, why, failed_usd + wasted)
            except ProviderError as e:
                tries += 0 if isinstance(e, CircuitOpen) else e.tries
                failed_usd += e.billed_usd
                errors.append(f"{ep.provider}:{ep.model}: {type(e).__name__}: {short(e)}")
                last = e
            except ConfigError as e:
                # The rung's own endpoint, tried first, cannot be built: nothing was paid, and
                # it is the user's to fix. A fallback that cannot be built (its key variable
                # holds a control character, say) is one more failed endpoint: raising would
                # lose what the endpoints before it billed, and one the load-aware order put
                # first (never timed, as it never answers) would end every request.
                if ep is rung and not errors:
                    raise
                errors.append(f"{ep.provider}:{ep.model}: ConfigError: {short(e)}")
                last = ProviderError(f"this fallback cannot be built: {e.detail}",
                                     provider=ep.provider, model=ep.model)
        assert last is not None
        last.tries = tries
        last.billed_usd = failed_usd
        last.failover_errors = errors  # type: ignore[attr-defined]
        raise last

    async def _call_endpoint(self, call: ModelCall, rung: RungConfig, deadline: float | None,
                             unanswered: list[RungConfig], retry: RetryConfig
                             ) -> tuple[Completion, int, float]:
        """One endpoint: breaker check, retries with backoff, breaker and latency bookkeeping;
        the reply, the tries, and what the billed tries that failed cost (on an error that
        gives up, its ``billed_usd``)."""
        # The provider first: one that cannot be built (a ConfigError) must not hold the
        # half-open probe the breaker check may grant, for a whole cool-down.
        provider = self._provider(rung)
        await self.store.breakers.acheck(rung.endpoint)
        attempts = retry.max_attempts if rung.max_retries is None else rung.max_retries + 1
        latency = self.store.latency
        cut_to: float | None = None  # what the last try was given, when the deadline cut it
        wasted = 0.0  # billed tries that failed (a malformed 200 is paid for)

        async def once() -> Completion:
            nonlocal cut_to, wasted
            t0 = self._clock()
            timeout = call.timeout_s
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - self._clock()))
            cut_to = timeout if timeout < call.timeout_s else None
            # The SDK's timeout bounds each read, not the whole call: a server trickling
            # bytes could hold it far longer, so the whole call is bounded here too.
            try:
                with anyio.fail_after(timeout + _BACKSTOP_S):
                    c = await provider.complete(
                        call if timeout == call.timeout_s else replace(call, timeout_s=timeout))
            except TimeoutError:
                unanswered.append(rung)
                raise ProviderTimeout(f"no complete reply within {timeout:g}s",
                                      provider=rung.provider, model=call.model) from None
            except ProviderError as e:
                if e.billed_tokens is not None:
                    wasted += rung.cost_usd(*e.billed_tokens)
                elif _maybe_billed(e):
                    unanswered.append(rung)  # kept at up to the estimate
                raise
            except anyio.get_cancelled_exc_class():  # the deadline, a client gone
                unanswered.append(rung)
                raise
            await latency.aobserve(rung.endpoint, self._clock() - t0)
            return c

        err: BaseException | None = None
        _LAST_TRIED[rung.endpoint] = self._clock()
        _IN_FLIGHT.add(rung.endpoint, 1)
        try:
            done, tries = await call_with_retry(
                once, max_attempts=max(1, attempts), base_delay_s=retry.base_delay_s,
                max_delay_s=retry.max_delay_s, jitter=retry.jitter, deadline=deadline,
                clock=self._clock,
            )
            return done, tries, wasted
        except ProviderError as e:
            e.billed_usd = wasted
            if isinstance(e, ProviderTimeout) and cut_to is not None and not self._fair(
                    rung, cut_to):
                err = NoVerdict(f"cut to {cut_to:g}s by the request's deadline")
                raise
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

    def _fair(self, rung: RungConfig, given_s: float) -> bool:
        """Whether ``given_s`` was a fair chance for the endpoint to answer (unknown: yes)."""
        mean = self.store.latency.mean_s(rung.endpoint)
        return mean is None or given_s >= _FAIR_CHANCE * mean


_BACKSTOP_S = 0.25
"""How far past the SDK's own timeout the whole-call bound fires: far enough that the SDK's
timeouts come first (a connect timeout then says nothing was sent, so nothing is kept for
it), and the bound only stops a server trickling bytes."""


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds else "not timed yet"


def endpoints_of(config: CascadeConfig) -> list[tuple[int, RungConfig, RungConfig]]:
    """Every endpoint of the ladder in climbing order: (rung index, rung, endpoint), the rung
    itself first, then its fallbacks (for health and probes)."""
    return [(i, rung, ep) for i, rung in enumerate(config.rungs) for ep in (rung, *rung.fallbacks)]

"""Circuit breakers per endpoint: skip a dead provider at once instead of waiting on it.

States of one endpoint::

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(cooldown_s passed; the next check() becomes the probe)──▶ half_open
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open (cool-down anew)

What counts as a failure: one *call* that ended, after its retries, in a retryable
:class:`~cascade.errors.ProviderError` (transport failure, timeout, 429, 5xx, malformed reply):
see :func:`counts_as_failure`. Any other outcome (an answer, even one the verifiers reject, or a
4xx the endpoint sent back) proves the endpoint is up and counts as a success.

State lives in the process (a ``threading.Lock`` guards it; every operation is short and
synchronous). :func:`breakers_for` hands out one shared registry per breaker configuration, so
every ``Cascade`` object in the process sees the same endpoint state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from cascade.config import BreakerConfig
from cascade.errors import CircuitOpen, ProviderError

__all__ = [
    "BreakerState",
    "CircuitBreakers",
    "NoVerdict",
    "breakers_for",
    "circuit_open_error",
    "counts_as_failure",
    "reset_default_breakers",
]

BreakerState = Literal["closed", "open", "half_open"]


class NoVerdict(Exception):
    """What a call that tells nothing about its endpoint is recorded as (it counts neither
    way, and frees a probe): e.g. one cut short by the request's own deadline."""


def counts_as_failure(err: BaseException | None) -> bool:
    """Whether a call's outcome counts against its endpoint's breaker (None means success)."""
    return isinstance(err, ProviderError) and err.retryable


@dataclass
class _Endpoint:
    failures: int = 0
    opened_at: float | None = None
    probe_started_at: float | None = None


class CircuitBreakers:
    """The breakers of many endpoints (any string; the engine uses ``RungConfig.endpoint``).

    Usage per call: ``check(endpoint)`` before (raises :class:`CircuitOpen` when the call must
    be skipped), then exactly one of ``record_success``/``record_failure`` after, or
    ``record(endpoint, err)`` which picks for you. A probe whose caller never reports (cancelled
    mid-call) is forgotten after another ``cooldown_s``, so an endpoint cannot stay stuck.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown_s = max(0.0, cooldown_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}

    def _state(self, ep: _Endpoint, now: float) -> BreakerState:
        if ep.opened_at is None:
            return "closed"
        return "open" if now - ep.opened_at < self.cooldown_s else "half_open"

    def check(self, endpoint: str) -> bool:
        """Let a call through or raise :class:`CircuitOpen`; True when this call is the probe.

        While half-open exactly one caller gets the probe; the others keep getting
        ``CircuitOpen`` until it reports.
        """
        with self._lock:
            ep = self._endpoints.get(endpoint)
            if ep is None or ep.opened_at is None:
                return False
            now = self._clock()
            if self._state(ep, now) == "open":
                wait = ep.opened_at + self.cooldown_s - now
                raise circuit_open_error(endpoint, f"after {ep.failures} consecutive failures; "
                                            f"next probe in {wait:.1f}s")
            if ep.probe_started_at is not None and now - ep.probe_started_at < self.cooldown_s:
                raise circuit_open_error(endpoint, "a probe request is in flight")
            ep.probe_started_at = now
            return True

    def record_success(self, endpoint: str) -> None:
        """The endpoint answered: close its circuit and forget its failures."""
        with self._lock:
            self._endpoints.pop(endpoint, None)

    def record_failure(self, endpoint: str) -> None:
        """One call failed for good (see :func:`counts_as_failure`): count it, maybe open."""
        with self._lock:
            ep = self._endpoints.setdefault(endpoint, _Endpoint())
            ep.failures += 1
            now = self._clock()
            if ep.opened_at is None:
                if ep.failures >= self.failure_threshold:
                    ep.opened_at = now
            elif self._state(ep, now) == "half_open":
                # The probe (or a call that started before the circuit opened) failed: the
                # endpoint is still down, so cool down afresh.
                ep.opened_at = now
                ep.probe_started_at = None

    def record(self, endpoint: str, err: BaseException | None) -> None:
        """Record a call's outcome: ``err`` is the exception it ended with, or None.

        A :class:`CircuitOpen` is ignored: that call never reached the endpoint.
        """
        if isinstance(err, CircuitOpen):
            return
        if counts_as_failure(err):
            self.record_failure(endpoint)
        elif err is None or isinstance(err, ProviderError):
            self.record_success(endpoint)
        else:
            self.release_probe(endpoint)

    def release_probe(self, endpoint: str) -> None:
        """The probe ended without telling anything (cancelled, a bug): let another probe go."""
        with self._lock:
            ep = self._endpoints.get(endpoint)
            if ep is not None:
                ep.probe_started_at = None

    def state(self, endpoint: str) -> BreakerState:
        with self._lock:
            ep = self._endpoints.get(endpoint)
            return "closed" if ep is None else self._state(ep, self._clock())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every endpoint with failures on record, for ``cascade.health()`` and traces.

        ``opened_at`` is a reading of the breaker's (monotonic) clock; ``seconds_until_probe``
        is 0 once a probe may go, None when the circuit is closed.
        """
        with self._lock:
            now = self._clock()
            out: dict[str, dict[str, Any]] = {}
            for name, ep in sorted(self._endpoints.items()):
                until = (
                    None if ep.opened_at is None
                    else max(0.0, ep.opened_at + self.cooldown_s - now)
                )
                out[name] = {
                    "state": self._state(ep, now),
                    "consecutive_failures": ep.failures,
                    "opened_at": ep.opened_at,
                    "seconds_until_probe": until,
                    "probe_in_flight": ep.probe_started_at is not None,
                }
            return out

    def reset(self) -> None:
        """Forget every endpoint (tests; an operator's manual reset)."""
        with self._lock:
            self._endpoints.clear()


def circuit_open_error(endpoint: str, why: str) -> CircuitOpen:
    """The error of a skipped call, naming the endpoint's provider and model (one format for
    the process breakers and the shared ones)."""
    parts = endpoint.split("|")
    provider, model = (parts[0], parts[-1]) if len(parts) == 3 else ("", "")
    return CircuitOpen(f"circuit open for endpoint {endpoint!r} {why}", provider=provider,
                       model=model)


_registry_lock = threading.Lock()
_registries: dict[tuple[int, float], CircuitBreakers] = {}


def breakers_for(config: BreakerConfig) -> CircuitBreakers:
    """The process-wide breakers for this configuration, shared by every ``Cascade``."""
    key = (config.failure_threshold, config.cooldown_s)
    with _registry_lock:
        breakers = _registries.get(key)
        if breakers is None:
            breakers = _registries[key] = CircuitBreakers(config.failure_threshold,
                                                          config.cooldown_s)
        return breakers


def reset_default_breakers() -> None:
    """Drop the shared registries (tests, or a fresh start after a provider outage)."""
    with _registry_lock:
        _registries.clear()


def all_breaker_snapshots() -> dict[str, dict[str, Any]]:
    """Every endpoint known to any shared registry in this process (for ``cascade.health()``)."""
    with _registry_lock:
        registries = list(_registries.values())
    out: dict[str, dict[str, Any]] = {}
    for breakers in registries:
        out.update(breakers.snapshot())
    return out

"""The facade: a :class:`Cascade` owns a ladder, its providers (one set per event loop), the
store (cache, budgets, breakers, latency, counters), observers, and the shadow checks.

The data path of one request reads one way: request → cache → (router) → rung → verifiers →
policy → trace → cache store → observers (audit, metrics, spans). :mod:`cascade.climb` climbs,
:mod:`cascade.caller` calls endpoints, :mod:`cascade.policy` decides, :mod:`cascade.shadow`
samples production against the top rung off the response path. ``aanswer`` is the one
implementation; the sync ``answer`` runs it on a private loop thread so SDK clients stay bound
to one loop.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypedDict, Unpack

import anyio
import anyio.lowlevel

from cascade import policy
from cascade.budget import BudgetStore, budget_key
from cascade.cache import AnswerCache
from cascade.caller import CallResult, EndpointCaller, endpoints_of
from cascade.climb import Climb, Money, OnAttempt
from cascade.config import CascadeConfig, RungConfig, check_cap, load_config, parse_config
from cascade.drift import DriftMonitor
from cascade.errors import (
    BudgetExceeded,
    CacheError,
    CascadeError,
    ConfigError,
    DeadlineExceeded,
    NoAnswerError,
    UnverifiedAnswerError,
    UnverifiedWithinBudget,
)
from cascade.ladder import Ladder, check_verifier_list
from cascade.messages import Message, Request, make_request, number_arg
from cascade.providers import make_provider
from cascade.providers.base import ModelCall, Provider
from cascade.shadow import ShadowJob, Shadows, shadow_stats
from cascade.store import open_store
from cascade.store.base import Store
from cascade.store.local import LocalCache, process_latency
from cascade.syncloop import LoopEnd, LoopThread
from cascade.trace import Answer, Attempt

__all__ = ["AnswerOptions", "CacheMode", "Cascade", "health", "propagates"]

log = logging.getLogger("cascade")


def propagates(e: BaseException) -> bool:
    """Whether a ``BaseException`` that is not an ``Exception`` must go on up: an interrupt,
    a generator closing, or this task's cancellation. Anything else of that kind (a plugin's
    or an observer's ``SystemExit``) is that one piece's failure, contained where it ran.
    Call it inside the event loop (it asks anyio for the backend's cancellation class)."""
    return isinstance(e, (KeyboardInterrupt, GeneratorExit, anyio.get_cancelled_exc_class()))

CacheMode = bool | Literal["refresh"]


class AnswerOptions(TypedDict, total=False):
    """The keywords of :meth:`Cascade.aanswer`, for the twins that pass them on (IDEs and type
    checkers see each one)."""

    messages: Sequence[Mapping[str, Any] | Message] | None
    schema: Any
    schema_options: Mapping[str, Any] | None
    config: CascadeConfig | Mapping[str, Any] | str | os.PathLike[str] | None
    verifiers: Sequence[Any] | None
    max_cost_usd: float | None
    timeout_s: float | None
    cache: CacheMode
    metadata: Mapping[str, Any] | None
    on_attempt: OnAttempt | None
    request_id: str | None
_LADDERS_KEPT = 16


def health() -> dict[str, Any]:
    """A snapshot of every endpoint this process has called: circuit state and latency."""
    from cascade.breaker import all_breaker_snapshots

    endpoints: dict[str, Any] = {}
    for ep, snap in all_breaker_snapshots().items():
        endpoints.setdefault(ep, {})["circuit"] = snap
    for ep, sh in shadow_stats().items():
        endpoints.setdefault(ep, {})["shadow"] = {
            **sh, "disagreement_rate": sh["disagreements"] / max(1, sh["samples"])}
    for ep, lat in process_latency().snapshot().items():
        endpoints.setdefault(ep, {}).setdefault("circuit", {"state": "closed"})
        endpoints[ep].update(lat)
    return {"endpoints": endpoints}


class Cascade:
    """A configured ladder. Reuse one object: it holds connections, breakers and the cache."""

    def __init__(
        self,
        config: CascadeConfig,
        *,
        verifiers: Sequence[Any] | None = None,
        provider_factory: Callable[[RungConfig], Provider] | None = None,
        cache: AnswerCache | None = None,
        budget_store: BudgetStore | None = None,
        store: Store | None = None,
        observers: Sequence[Any] = (),
        audit_log: Any = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for obs in observers:
            for hook in ("on_answer", "on_shadow"):
                if inspect.iscoroutinefunction(getattr(obs, hook, None)):
                    # called on the response path, never awaited: it would silently not run
                    raise ConfigError(f"observer {obs!r}: {hook} must be a plain function "
                                      "(observers never block: queue slow work elsewhere)",
                                      source="observers")
        self.config = config
        self._provider_factory = provider_factory or make_provider
        self._providers: dict[tuple[Any, str], Provider] = {}
        self._providers_lock = threading.Lock()
        self._loop_watchers: dict[Any, LoopEnd] = {}
        self._store = store if store is not None else open_store(
            config, cache=cache, budget_store=budget_store, clock=clock)
        # One clock for deadlines, latency and (when injected) the breakers: tests run in
        # fake time by passing e.g. cascade.testing.FakeClock().
        self._clock = clock = clock or time.monotonic
        self._caller = EndpointCaller(config, self._store, self._provider, clock)
        self._ladder = Ladder(config, verifiers)
        self._ladders: OrderedDict[str, Ladder] = OrderedDict()
        self._drift: dict[str, DriftMonitor] = {}
        self._sync = LoopThread("cascade-sync")
        self.observers: list[Any] = list(observers)
        """Called after every answer (``on_answer``) and shadow check (``on_shadow``)."""
        self.audit_log: Any = None
        if audit_log is not None:
            self.audit_log = self._open_audit(audit_log, config)
            self.observers.append(self.audit_log)
        self._shadows = Shadows(self._caller, observers=lambda: self.observers,
                                drift=self._monitor)

    @staticmethod
    def _open_audit(audit_log: Any, config: CascadeConfig) -> Any:
        if isinstance(audit_log, (str, os.PathLike)):
            # its writer thread starts only when asked
            from cascade.audit import AuditLog
            from cascade.secrets import secret_envs_of

            # The ladder's keys are cut from its lines, as ``cascade serve``'s log cuts them.
            return AuditLog(audit_log, secret_envs=secret_envs_of(config))
        return audit_log

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kw: Any) -> Cascade:
        """Load a TOML config file."""
        return cls(load_config(path), **kw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **kw: Any) -> Cascade:
        """Build from a mapping shaped like the TOML file."""
        return cls(parse_config(data, source="<dict>"), **kw)

    @classmethod
    def default(cls, config_path: str | os.PathLike[str] | None = None, **kw: Any) -> Cascade:
        """The configured ladder (explicit path, ``$CASCADE_CONFIG``, ``./cascade.toml``), else
        the embedded local ladder that needs no API key."""
        from cascade.defaults import resolve_config

        return cls(resolve_config(config_path), **kw)

    @property
    def store(self) -> Store:
        """Where this Cascade keeps what requests share (local, or Redis with ``[store]``)."""
        return self._store

    @property
    def cache(self) -> AnswerCache:
        """The local verified-answer cache (``cascade cache`` and tests read it directly)."""
        c = self._store.cache
        if not isinstance(c, LocalCache):
            raise CacheError("this Cascade's cache is not a local disk cache")
        return c.sync

    def _ladder_for(self, config: Any, verifiers: Sequence[Any] | None) -> Ladder:
        """The ladder of a per-call ``config=`` / ``verifiers=``: built once, then reused."""
        if config is None and verifiers is None:
            return self._ladder
        if isinstance(config, Mapping):
            config = parse_config(config, source="<config argument>")
        elif isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        elif config is not None and not isinstance(config, CascadeConfig):
            raise ConfigError("must be a CascadeConfig, a TOML path or a dict shaped like the "
                              f"file, not {type(config).__name__}", source="request",
                              key="config")
        cfg = config or self.config
        key = f"{id(cfg)}:{[id(v) for v in check_verifier_list(verifiers)]}"
        ladder = self._ladders.get(key)
        if ladder is None or ladder.config is not cfg:
            ladder = Ladder(cfg, verifiers, base=self._ladder)
            self._ladders[key] = ladder
            while len(self._ladders) > _LADDERS_KEPT:
                self._ladders.popitem(last=False)
        self._ladders.move_to_end(key)
        return ladder

    def _monitor(self, ladder: Ladder) -> DriftMonitor | None:
        """The drift monitor of a ladder whose rungs have tolerated disagreement rates."""
        if not ladder.drift_thresholds:
            return None
        m = self._drift.get(ladder.name)
        if m is None:
            m = self._drift[ladder.name] = DriftMonitor(
                self._store.counters, ladder=ladder.name, thresholds=ladder.drift_thresholds,
                alpha=ladder.config.policy.drift_alpha)
        return m

    # ------------------------------------------------------------------ providers

    def _provider(self, rung: RungConfig) -> Provider:
        # SDK clients hold connection pools bound to one event loop: one provider per loop,
        # closed when that loop ends (a program calling asyncio.run again and again).
        here = anyio.lowlevel.current_token()
        key = (here, rung.endpoint + "|" + (rung.api_key_env or ""))
        with self._providers_lock:
            p = self._providers.get(key)
            if p is None:
                p = self._providers[key] = self._provider_factory(rung)
                if here not in self._loop_watchers:
                    self._loop_watchers[here] = LoopEnd(
                        functools.partial(self._close_providers, here))
            return p

    async def _close_providers(self, loop: Any) -> None:
        """Close the providers of ``loop`` (the current one) and forget them."""
        with self._providers_lock:
            mine = [(k, p) for k, p in self._providers.items() if k[0] == loop]
            for k, _ in mine:
                del self._providers[k]
            watcher = self._loop_watchers.pop(loop, None)
            if watcher is not None:  # closed now: not again when the loop ends
                watcher.disarm()
        for _, p in mine:
            await p.aclose()

    async def call_model(self, call: ModelCall, rung: RungConfig) -> CallResult:
        """One model call through this ladder's retries, circuit breakers and failover, with no
        verification and no cache (``cascade record`` and ``cascade health --probe`` use it):
        the reply and the endpoint that gave it (a fallback bills at its own price)."""
        return await self._caller.call(call, rung, None)

    # ------------------------------------------------------------------ the request

    async def aanswer(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any] | Message] | None = None,
        schema: Any = None,
        schema_options: Mapping[str, Any] | None = None,
        config: CascadeConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        verifiers: Sequence[Any] | None = None,
        max_cost_usd: float | None = None,
        timeout_s: float | None = None,
        cache: CacheMode = True,
        metadata: Mapping[str, Any] | None = None,
        on_attempt: OnAttempt | None = None,
        request_id: str | None = None,
    ) -> Answer:
        """Answer one request, climbing the ladder only as far as the verifiers require.

        ``on_attempt(attempt)`` (sync or async) is called as each rung finishes: the climb's
        progress, e.g. for a stream. ``request_id`` is the caller's own id for the request
        (known before the answer, as a stream's headers need it); a new one by default.
        """
        t0 = self._clock()
        ladder = self._ladder_for(config, verifiers)
        request = make_request(prompt, messages, schema=schema, schema_options=schema_options,
                               metadata=metadata, request_id=request_id)
        request_id = request.id
        if on_attempt is not None and not callable(on_attempt):
            raise ConfigError(f"must be a function, not {type(on_attempt).__name__}",
                              source="request", key="on_attempt")
        cap = number_arg(max_cost_usd, "max_cost_usd")
        if cap is not None:
            check_cap(ladder.config.rungs, "max_cost_usd")
        timeout = number_arg(timeout_s, "timeout_s")
        if cache not in (True, False, "refresh") or not isinstance(cache, (bool, str)):
            raise ConfigError("cache must be True, False or 'refresh'", source="request",
                              key="cache")
        answer: Answer | None = None
        error: BaseException | None = None
        try:
            answer = await self._answer(request, ladder, request_id, t0, cap=cap,
                                        limit_s=timeout, cache=cache, on_attempt=on_attempt)
            return answer
        except BaseException as e:
            error = e
            if isinstance(e, CascadeError) and not getattr(e, "request_id", None):
                e.request_id = request_id  # type: ignore[attr-defined]  # audit, 429/504 headers
            raise
        finally:
            self._notify(request, answer, error)

    async def _answer(self, request: Request, ladder: Ladder, request_id: str, t0: float, *,
                      cap: float | None, limit_s: float | None, cache: CacheMode,
                      on_attempt: OnAttempt | None) -> Answer:
        cfg = ladder.config
        store = self._store
        use_cache = cache is not False and cfg.cache.enabled and store.cache is not None
        key = ladder.request_key(request) if use_cache else None
        warnings: list[str] = []
        if use_cache and key is None:
            warnings.append("not cached: verifier(s) given as code without a cache_key: "
                            + ", ".join(ladder.uncacheable))
        if key is not None and cache is True and store.cache is not None:
            try:
                hit = await store.cache.aget(key)
            except CacheError as e:
                if not store.shared:
                    raise
                hit = None  # a shared cache that is down is bypassed, with a warning
                warnings.append(f"cache bypassed: {e}")
            if hit is not None:
                hit.cache_hit = True
                hit.route = None  # no router ran for this request (the ladder may have none)
                hit.cost_usd = 0.0
                hit.latency_ms = (self._clock() - t0) * 1000
                hit.metadata = request.metadata
                hit.request_id = request_id
                hit.parsed = _revive(hit.parsed, request.output_type)
                return hit

        # Providers (and the SDKs they import) are made before the deadline starts: a first
        # request's imports are not the model's time.
        for rung in cfg.rungs:
            self._provider(rung)
        t_start = self._clock()
        timeout = limit_s if limit_s is not None else cfg.timeout_s
        budget = cfg.budget
        money = Money(
            budgets=store.budgets,
            max_cost_usd=(cap if cap is not None else cfg.max_cost_usd),
            budget_key=budget_key(request.metadata) if budget.limit_usd is not None else None,
            limit_usd=budget.limit_usd, period_s=budget.period_s,
        )
        monitor = self._monitor(ladder)
        if monitor is not None:
            await monitor.maybe_refresh(self._clock())
        climb = Climb(request=request, ladder=ladder, caller=self._caller, money=money,
                      deadline=None if timeout is None else t_start + timeout,
                      drift=monitor, on_attempt=on_attempt,
                      clock=self._clock)
        accepted: tuple[Attempt, Any] | None = None
        # Only this scope's own expiry is the deadline: a TimeoutError raised by the caller's
        # code (``on_attempt``) is theirs, and propagates like any other error.
        scope = None if timeout is None else anyio.move_on_after(
            max(0.0, climb.remaining_s() or 0))
        with scope or contextlib.nullcontext():
            try:
                accepted = await climb.run()
            except anyio.get_cancelled_exc_class() as e:
                if scope is None or not scope.cancel_called:  # a client gone, a shutdown
                    climb.cut_off("Cancelled", "the request was cancelled during this rung")
                    # the observers (the audit line) get the trace and what it cost
                    e.answer = self._partial(climb, request, t0)  # type: ignore[attr-defined]
                raise
        deadline_hit = scope is not None and scope.cancelled_caught
        if deadline_hit:
            climb.cut_off("DeadlineExceeded",
                          f"the request's deadline of {timeout:g}s ran out during this rung")

        chosen = accepted or climb.candidate
        if chosen is None:
            reasons = [f"rung skipped: {s.kind}: {s.detail}" for s in climb.skips] + climb.notes
            if deadline_hit:
                reasons.append(f"deadline of {timeout:g}s reached")
            msg = "; ".join(reasons) or "every rung failed"
            empty = self._partial(climb, request, t0)
            outcome = policy.no_answer_outcome(
                climb.skips, deadline_hit=deadline_hit,
                any_error=any(a.status == "error" for a in climb.attempts))
            # The trace travels with each error: a call paid before the deadline cut its
            # verifiers short is in the audit line's cost and trace.
            if outcome is policy.Outcome.DEADLINE:
                raise DeadlineExceeded(f"no answer within {timeout:g}s: {msg}", empty)
            if outcome is policy.Outcome.BUDGET:
                raise BudgetExceeded(f"no rung fits the budget: {msg}", key=money.budget_key,
                                     spent_usd=money.spent_usd, answer=empty)
            raise NoAnswerError(f"no rung produced an answer: {msg}", empty)
        attempt, parsed = chosen
        answer = Answer(
            text=attempt.text or "", model=attempt.model, verified=accepted is not None,
            attempts=climb.attempts, parsed=parsed, cost_usd=money.spent_usd,
            latency_ms=(self._clock() - t0) * 1000, cache_key=key,
            metadata=request.metadata, request_id=request_id, warnings=warnings,
            route=climb.route,
        )
        if answer.verified and key is not None and store.cache is not None:
            try:
                await store.cache.aset(key, answer)
            except CacheError as e:  # the answer was paid for: return it, say it was not kept
                log.warning("a verified answer was not cached: %s", e)
                answer.warnings.append(f"not cached: {e}")
        top = len(cfg.rungs) - 1
        # rungs the drift alarm kept from exiting: compared with the top rung's answer, free
        # when the climb has one (accepted or not), else on the accepted rung's shadow check
        held = () if monitor is None else tuple(
            a for a in climb.attempts if a.rung < top and policy.held_by_drift(a.verdicts))
        if accepted is not None and attempt.rung < top:
            self._shadows.sample(ShadowJob(request=request, ladder=ladder, accepted=attempt,
                                           money=money.for_shadow(), held=held))
        elif held and attempt.rung == top and attempt.text is not None:
            for h in held:
                self._shadows.compare(ShadowJob(request=request, ladder=ladder,
                                                accepted=h, money=money), attempt)
        if not answer.verified and cfg.policy.on_unverified == "raise":
            # the answer given is the latest that came back (the top rung may have errored):
            # its own verdicts say why it was rejected
            why = (f"the answer given ({answer.model}, rung {attempt.rung}) was rejected: "
                   f"{policy.rejection_reason(attempt.verdicts)}")
            unpaid = climb.money_skip(attempt.rung)
            if unpaid is not None:
                i, skip = unpaid
                capped = skip.kind == "cap"  # else the key's budget
                raise UnverifiedWithinBudget(
                    f"{why}; rung {i} ({cfg.rungs[i].label}) was not tried: budget: "
                    f"{skip.detail}", answer,
                    key=None if capped else money.budget_key, spent_usd=money.spent_usd,
                    limit_usd=(money.max_cost_usd if capped else money.limit_usd) or 0.0)
            raise UnverifiedAnswerError(why, answer)
        return answer

    def _partial(self, climb: Climb, request: Request, t0: float) -> Answer:
        """The trace of a climb that ended without an answer, for the error it raises."""
        return Answer(text="", model="", verified=False, attempts=climb.attempts,
                      cost_usd=climb.money.spent_usd, latency_ms=(self._clock() - t0) * 1000,
                      metadata=request.metadata, request_id=request.id, route=climb.route)

    def _notify(self, request: Request, answer: Answer | None,
                error: BaseException | None) -> None:
        for obs in self.observers:
            try:
                obs.on_answer(request, answer, error)
            except Exception as e:  # an observer's bug never costs the answer
                log.warning("observer %r failed: %s", obs, e)
            except BaseException as e:  # SystemExit and the like, from an observer: still its bug
                if propagates(e):
                    raise
                log.error("observer %r raised %s; the answer is kept", obs, type(e).__name__)

    # ------------------------------------------------------------------ the loop around it

    async def ahealth(self) -> dict[str, Any]:
        """Endpoints (circuit, latency) and drift alarms as this ladder's store sees them."""
        endpoints: dict[str, Any] = {}
        try:
            breakers = await self._store.breakers.asnapshot()
        except Exception as e:
            breakers = {}
            log.warning("breaker state unavailable: %s", e)
        latency = self._store.latency.snapshot()
        for _i, _rung, ep in endpoints_of(self.config):
            endpoints[ep.endpoint] = {"circuit": breakers.get(ep.endpoint, {"state": "closed"}),
                                      **latency.get(ep.endpoint, {})}
        drift: dict[str, Any] = {}
        monitor = self._monitor(self._ladder)
        if monitor is not None:
            try:
                drift = {k: s.to_dict() for k, s in (await monitor.refresh()).items()}
            except Exception as e:
                log.warning("drift state unavailable: %s", e)
        await self.asettle_kept()  # a health check nudges an idle process
        return {"endpoints": endpoints, "drift": drift, "shared_store": self._store.shared,
                "store": self._store.status(), "shadow_dropped": self._shadows.dropped}

    async def asettle_kept(self) -> None:
        """Record the spend kept while the shared store was down, if it answers now: requests
        do it as they reserve, but a process without budgeted traffic kept it (and the budget
        under-counted) until its next one. ``cascade serve`` calls it every few seconds."""
        settle = getattr(self._store, "asettle_kept", None)  # a store of your own may lack it
        try:
            if settle is not None:
                await settle()
        except Exception as e:
            log.warning("kept settles not recorded yet: %s", e)

    async def afeedback(self, request_id: str, correct: bool, expected: str | None = None,
                        *, client: str | None = None) -> None:
        """Record a user's judgement of an answer into the audit log (feeds ``cascade label``
        and ``cascade suite from-log``)."""
        if self.audit_log is None:
            raise ConfigError("feedback needs an audit log: Cascade(audit_log=PATH) or "
                              "[server] audit_log", source="request", key="feedback")
        self.audit_log.feedback(request_id, correct, expected, client=client)

    def feedback(self, request_id: str, correct: bool, expected: str | None = None, *,
                 client: str | None = None) -> None:
        """The sync twin of :meth:`afeedback`."""
        self._sync.call(lambda: self.afeedback(request_id, correct, expected, client=client))

    def drain_shadows(self, timeout_s: float | None = 30.0) -> bool:
        """Wait for shadow checks in flight; True when none is left (tests, shutdown)."""
        return self._shadows.drain(timeout_s)

    async def aanswer_many(self, requests: Sequence[str | Mapping[str, Any]], *,
                           concurrency: int = 8) -> list[Answer | Exception]:
        """Answer many requests with bounded concurrency; results in input order.

        Each item is a prompt string or a dict of ``aanswer`` keyword arguments. Every slot
        holds its own request's answer or error (a typed CascadeError, or what a plugin
        raised); one request never takes the others down, whatever it raises.
        """
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError("concurrency must be an integer >= 1", source="request",
                              key="concurrency")
        results: list[Answer | Exception | None] = [None] * len(requests)
        limiter = anyio.CapacityLimiter(concurrency)
        cancelled = anyio.get_cancelled_exc_class()

        async def one(i: int, item: str | Mapping[str, Any]) -> None:
            async with limiter:
                try:
                    if isinstance(item, str):
                        results[i] = await self.aanswer(item)
                    elif isinstance(item, Mapping):
                        results[i] = await self.aanswer(**item)
                    else:
                        raise ConfigError("each request must be a prompt string or a dict of "
                                          "aanswer arguments", source="request",
                                          key=f"requests[{i}]")
                except Exception as e:
                    results[i] = e
                except cancelled:
                    if _really_cancelled():
                        raise
                    results[i] = CascadeError(f"request {i} was cancelled from inside a plugin")
                except BaseException as e:  # SystemExit, KeyboardInterrupt from a plugin
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    results[i] = CascadeError(f"request {i} raised {type(e).__name__}: {e}")

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(requests):
                tg.start_soon(one, i, item)
        out: list[Answer | Exception] = []
        for i, r in enumerate(results):
            out.append(r if r is not None else CascadeError(f"request {i} produced nothing"))
        return out

    def answer(self, prompt: str | None = None, **options: Unpack[AnswerOptions]) -> Answer:
        """The sync twin of :meth:`aanswer` (runs it on this object's event-loop thread)."""
        return self._sync.call(lambda: self.aanswer(prompt, **options))

    def answer_many(self, requests: Sequence[str | Mapping[str, Any]], *,
                    concurrency: int = 8) -> list[Answer | Exception]:
        """The sync twin of :meth:`aanswer_many`."""
        return self._sync.call(lambda: self.aanswer_many(requests, concurrency=concurrency))

    async def aclose(self) -> None:
        """Close this event loop's connections, providers' and the store's (the Cascade may
        be used again: both reconnect on demand)."""
        await self._close_providers(anyio.lowlevel.current_token())
        await self._store.aclose()
        flush = getattr(self.audit_log, "flush", None)
        if callable(flush):  # `async with Cascade(...)` ends with its lines on disk
            await anyio.to_thread.run_sync(flush)

    def close(self) -> None:
        """Close connections, the shadow checks, the sync loop, the store and the audit log."""
        try:
            self._shadows.close(self.aclose)  # its loop's connections close on that loop
            self._sync.stop(self.aclose)
        finally:
            with self._providers_lock:
                left = list(self._providers.values())
                self._providers.clear()
            for p in left:  # made on loops that have ended: nothing to await them on
                with contextlib.suppress(Exception):
                    anyio.run(p.aclose)
            closer = getattr(self._store, "close", None)
            if callable(closer):
                closer()
            if self.audit_log is not None and hasattr(self.audit_log, "close"):
                self.audit_log.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Cascade:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _really_cancelled() -> bool:
    """Whether the current task is being cancelled from outside (not a plugin's own raise)."""
    import asyncio

    try:
        task = asyncio.current_task()
    except RuntimeError:
        return True
    return task is None or task.cancelling() > 0


def _revive(parsed: Any, output_type: type[Any] | None) -> Any:
    if parsed is None or output_type is None or not hasattr(output_type, "model_validate"):
        return parsed
    return output_type.model_validate(parsed)


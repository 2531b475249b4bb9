"""The climb: request → cache → rung → verifiers → policy → trace → cache store.

A :class:`Cascade` owns a config, its verifiers, provider clients (one set per event loop), the
answer cache, circuit breakers and budget store. ``aanswer`` is the one implementation; the sync
``answer`` runs it on a private event-loop thread so SDK clients stay bound to one loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from cascade.breaker import all_breaker_snapshots, breakers_for
from cascade.budget import Budget, BudgetStore
from cascade.cache import AnswerCache, cache_key
from cascade.config import (
    CascadeConfig,
    RungConfig,
    VerifierConfig,
    load_config,
    parse_config,
)
from cascade.errors import (
    BudgetExceeded,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    NoAnswerError,
    ProviderError,
    ProviderTimeout,
    UnverifiedAnswerError,
)
from cascade.messages import Message, Request, normalise_messages
from cascade.plugins import load_verifier
from cascade.policy import accepts, rejection_reason
from cascade.providers import make_provider
from cascade.providers.base import Completion, ModelCall, Provider, rung_call
from cascade.retry import call_with_retry
from cascade.tokens import estimate_cost
from cascade.trace import Answer, Attempt, Verdict
from cascade.verify import (
    BoundVerifier,
    Candidate,
    Verifier,
    VerifyContext,
    as_verifier,
    run_verifiers,
)

__all__ = ["CacheMode", "Cascade", "health"]

log = logging.getLogger("cascade")

CacheMode = bool | Literal["refresh"]
_T = TypeVar("_T")
_LATENCY: dict[str, _Latency] = {}
_SHADOW: dict[str, dict[str, int]] = {}
"""Per endpoint of an accepting rung: shadow checks against the top rung, and disagreements."""
_random = random.Random()


@dataclass
class _Latency:
    """An exponentially weighted mean of an endpoint's observed call latency."""

    mean_s: float = 0.0
    calls: int = 0
    failures: int = 0

    def observe(self, seconds: float) -> None:
        self.calls += 1
        a = 0.2 if self.calls > 1 else 1.0
        self.mean_s += a * (seconds - self.mean_s)


def health() -> dict[str, Any]:
    """A snapshot of every endpoint this process has called: circuit state and latency."""
    endpoints: dict[str, Any] = {}
    for ep, snap in all_breaker_snapshots().items():
        endpoints.setdefault(ep, {})["circuit"] = snap
    for ep, sh in list(_SHADOW.items()):
        endpoints.setdefault(ep, {})["shadow"] = {
            **sh, "disagreement_rate": sh["disagreements"] / max(1, sh["samples"])}
    for ep, lat in list(_LATENCY.items()):
        endpoints.setdefault(ep, {}).setdefault("circuit", {"state": "closed"})
        endpoints[ep].update(
            calls=lat.calls, failures=lat.failures, mean_latency_ms=round(lat.mean_s * 1000, 3)
        )
    return {"endpoints": endpoints}


def _schema_parts(schema: Any) -> tuple[Mapping[str, Any] | None, type[Any] | None]:
    if schema is None:
        return None, None
    if isinstance(schema, Mapping):
        return schema, None
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema(), schema
    raise ConfigError(
        f"schema must be a JSON Schema dict or a pydantic model class, not {schema!r}",
        source="request", key="schema",
    )


@dataclass
class _Climb:
    """Mutable state of one request's climb."""

    request: Request
    config: CascadeConfig
    deadline: float | None
    max_cost_usd: float | None
    budget_key: str | None
    attempts: list[Attempt] = field(default_factory=list)
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    """Estimates of verifier calls in flight, held against ``max_cost_usd``."""
    candidate: tuple[Attempt, Any] | None = None
    """The latest answer that came back (attempt, parsed): returned unverified if none passes."""
    skip_reasons: list[str] = field(default_factory=list)

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def over_cap(self, estimate: float) -> bool:
        """Whether a call estimated at ``estimate`` would break ``max_cost_usd``."""
        return (self.max_cost_usd is not None
                and self.spent_usd + self.reserved_usd + estimate > self.max_cost_usd)


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
    ) -> None:
        self.config = config
        self._provider_factory = provider_factory or make_provider
        self._providers: dict[tuple[Any, str], Provider] = {}
        self._providers_lock = threading.Lock()
        self._cache = cache
        self._budget_store = budget_store
        self._budget = Budget(config.budget, budget_store)
        self._breakers = breakers_for(config.breaker)
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._portal_thread: threading.Thread | None = None
        self._portal_lock = threading.Lock()
        self._verifiers = self._build_verifiers(config, verifiers)
        self._engine_verifiers: dict[tuple[str, tuple[tuple[str, Any], ...]], Verifier] = {}

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

    @staticmethod
    def _build_verifiers(config: CascadeConfig, extra: Sequence[Any] | None
                         ) -> dict[str, tuple[VerifierConfig, Verifier]]:
        out: dict[str, tuple[VerifierConfig, Verifier]] = {}
        for i, vc in enumerate(config.verifiers):
            try:
                out[vc.key] = (vc, load_verifier(vc, relative_to=config.source))
            except ConfigError as e:  # say which file and table, not only which verifier
                key = f"verifiers[{i}]" + (f".{e.key}" if e.key else "")
                raise type(e)(e.detail, source=config.source, key=key) from None
        for obj in extra or ():
            v = as_verifier(obj)
            vc = VerifierConfig(name=f"<code>:{v.name}", id=v.name)
            out[vc.key] = (vc, v)
        return out

    @property
    def cache(self) -> AnswerCache:
        if self._cache is None:
            c = self.config.cache
            self._cache = AnswerCache(c.directory, ttl_s=c.ttl_s, size_limit_mb=c.size_limit_mb)
        return self._cache

    # ------------------------------------------------------------------ providers

    def _provider(self, rung: RungConfig) -> Provider:
        # SDK clients hold connection pools bound to one event loop: one provider per loop.
        key = (anyio.lowlevel.current_token(), rung.endpoint + "|" + (rung.api_key_env or ""))
        with self._providers_lock:
            p = self._providers.get(key)
            if p is None:
                p = self._providers[key] = self._provider_factory(rung)
            return p

    async def _call_endpoint(self, call: ModelCall, rung: RungConfig, climb: _Climb | None
                             ) -> tuple[Completion, int]:
        """One endpoint: breaker check, retries with backoff, breaker bookkeeping."""
        self._breakers.check(rung.endpoint)
        provider = self._provider(rung)
        retry = self.config.retry
        attempts = retry.max_attempts if rung.max_retries is None else rung.max_retries + 1
        deadline = climb.deadline if climb else None
        lat = _LATENCY.setdefault(rung.endpoint, _Latency())

        async def once() -> Completion:
            t0 = time.monotonic()
            timeout = call.timeout_s
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - time.monotonic()))
            # The SDK's timeout bounds each read, not the whole call: a server trickling
            # bytes could hold it far longer, so the whole call is bounded here too.
            try:
                with anyio.fail_after(timeout + 0.05):
                    c = await provider.complete(
                        call if timeout == call.timeout_s else replace(call, timeout_s=timeout))
            except TimeoutError:
                raise ProviderTimeout(f"no complete reply within {timeout:g}s",
                                      provider=rung.provider, model=call.model) from None
            lat.observe(time.monotonic() - t0)
            return c

        err: BaseException | None = None
        try:
            completion, tries = await call_with_retry(
                once, max_attempts=max(1, attempts), base_delay_s=retry.base_delay_s,
                max_delay_s=retry.max_delay_s, jitter=retry.jitter, deadline=deadline,
            )
            return completion, tries
        except ProviderError as e:
            lat.failures += 1
            err = e
            raise
        except BaseException as e:  # cancelled mid-call: tells nothing about the endpoint
            err = e
            raise
        finally:
            self._breakers.record(rung.endpoint, err)

    async def _call_rung(self, call: ModelCall, rung: RungConfig, climb: _Climb | None
                         ) -> tuple[Completion, RungConfig, int, list[str]]:
        """Call a rung, failing over to its configured alternative endpoints in order."""
        errors: list[str] = []
        tries = 0
        last: ProviderError | None = None
        for ep in (rung, *rung.fallbacks):
            try:
                ep_call = call if ep.model == call.model else replace(call, model=ep.model)
                c, n = await self._call_endpoint(ep_call, ep, climb)
                return c, ep, tries + n, errors
            except ProviderError as e:
                tries += 0 if isinstance(e, CircuitOpen) else e.tries
                errors.append(f"{ep.provider}:{ep.model}: {type(e).__name__}: {_short(e)}")
                last = e
        assert last is not None
        last.tries = tries
        last.failover_errors = errors  # type: ignore[attr-defined]
        raise last

    def _estimate(self, rung: RungConfig, messages: Sequence[Message], climb: _Climb) -> float:
        """A call's most likely cost; token counting only serves a cap, so without one, 0
        (and tiktoken's encoding is never loaded)."""
        if climb.max_cost_usd is None and not self._budget.enabled:
            return 0.0
        return estimate_cost(rung, messages)

    async def call_model(self, call: ModelCall, rung: RungConfig) -> Completion:
        """One model call through this ladder's retries, circuit breakers and failover, with no
        verification and no cache (``cascade record`` uses it)."""
        completion, _ep, _tries, _errors = await self._call_rung(call, rung, None)
        return completion

    async def _verifier_call(self, call: ModelCall, rung: RungConfig, climb: _Climb
                             ) -> Completion:
        """A verifier's model call: the same retries, breakers, deadline and money guards as a
        rung's, and charged to the request as soon as it returns."""
        estimate = self._estimate(replace(rung, max_tokens=call.max_tokens), call.messages, climb)
        if climb.over_cap(estimate):
            assert climb.max_cost_usd is not None
            raise BudgetExceeded(
                f"a verifier call to {rung.label} (estimated ${estimate:.6f}) would exceed "
                f"max_cost_usd=${climb.max_cost_usd:g} (${climb.spent_usd:.6f} spent)",
                spent_usd=climb.spent_usd, limit_usd=climb.max_cost_usd)
        reservation = await self._budget.areserve(climb.request.metadata, estimate)
        climb.reserved_usd += estimate
        actual = 0.0
        try:
            c, _ep, _n, _errs = await self._call_rung(call, rung, climb)
            actual = rung.cost_usd(c.input_tokens, c.output_tokens)
            return c
        finally:
            climb.reserved_usd -= estimate
            climb.spent_usd += actual
            await self._budget.asettle(reservation, actual)

    # ------------------------------------------------------------------ the climb

    async def aanswer(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any] | Message] | None = None,
        schema: Any = None,
        config: CascadeConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        verifiers: Sequence[Any] | None = None,
        max_cost_usd: float | None = None,
        timeout_s: float | None = None,
        cache: CacheMode = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> Answer:
        """Answer one request, climbing the ladder only as far as the verifiers require."""
        if config is not None or verifiers is not None:
            if isinstance(config, Mapping):
                config = parse_config(config, source="<config argument>")
            elif config is not None and not isinstance(config, CascadeConfig):
                config = load_config(config)
            other = Cascade(config or self.config, verifiers=verifiers,
                            provider_factory=self._provider_factory, cache=self._cache,
                            budget_store=self._budget_store)
            try:
                return await other.aanswer(prompt, messages=messages, schema=schema,
                                           max_cost_usd=max_cost_usd, timeout_s=timeout_s,
                                           cache=cache, metadata=metadata)
            finally:
                await other.aclose()
                if other._cache is not None and other._cache is not self._cache:
                    other._cache.close()
        t0 = time.monotonic()
        json_schema, output_type = _schema_parts(schema)
        request = Request(messages=normalise_messages(prompt, messages), schema=json_schema,
                          output_type=output_type, metadata=dict(metadata or {}))
        cfg = self.config
        if cache not in (True, False, "refresh"):
            raise ConfigError("cache must be True, False or 'refresh'", source="request",
                              key="cache")
        use_cache = cache is not False and cfg.cache.enabled
        key = self._cache_key(request) if use_cache else None
        if key is not None and cache is True:
            hit = await anyio.to_thread.run_sync(self.cache.get, key)
            if hit is not None:
                hit.cache_hit = True
                hit.cost_usd = 0.0
                hit.latency_ms = (time.monotonic() - t0) * 1000
                hit.metadata = request.metadata
                hit.request_id = uuid.uuid4().hex
                hit.parsed = _revive(hit.parsed, output_type)
                return hit

        timeout = timeout_s if timeout_s is not None else cfg.timeout_s
        climb = _Climb(
            request=request, config=cfg,
            deadline=None if timeout is None else t0 + timeout,
            max_cost_usd=max_cost_usd if max_cost_usd is not None else cfg.max_cost_usd,
            budget_key=self._budget.key_for(request.metadata) if self._budget.enabled else None,
        )
        accepted: tuple[Attempt, Any] | None = None
        deadline_hit = False
        try:
            with (contextlib.nullcontext() if timeout is None
                  else anyio.fail_after(max(0.0, climb.remaining_s() or 0))):
                for i, rung in enumerate(cfg.rungs):
                    accepted = await self._climb_rung(climb, i, rung)
                    if accepted is not None:
                        break
                if (accepted is not None and accepted[0].rung < len(cfg.rungs) - 1
                        and cfg.policy.shadow_rate > 0
                        and _random.random() < cfg.policy.shadow_rate):
                    await self._shadow(climb, accepted[0])
        except TimeoutError:
            deadline_hit = True
            climb.skip_reasons.append(f"deadline of {timeout:g}s reached")
            if climb.attempts and climb.attempts[-1].status == "running":
                a = climb.attempts[-1]
                a.status, a.error_type = "error", "DeadlineExceeded"
                a.error = f"the request's deadline of {timeout:g}s ran out during this rung"

        answer = self._finish(climb, accepted, t0, key)
        if answer is None:
            msg = "; ".join(climb.skip_reasons) or "every rung failed"
            empty = Answer(text="", model="", verified=False, attempts=climb.attempts,
                           cost_usd=climb.spent_usd, latency_ms=(time.monotonic() - t0) * 1000,
                           metadata=request.metadata)
            if deadline_hit:
                raise DeadlineExceeded(f"no answer within {timeout:g}s: {msg}")
            if any("budget" in r for r in climb.skip_reasons) and not any(
                a.status == "error" for a in climb.attempts
            ):
                raise BudgetExceeded(f"no rung fits the budget: {msg}", key=climb.budget_key,
                                     spent_usd=climb.spent_usd)
            raise NoAnswerError(f"no rung produced an answer: {msg}", empty)
        if answer.verified and key is not None:
            await anyio.to_thread.run_sync(self.cache.set, key, answer)
        if not answer.verified and cfg.policy.on_unverified == "raise":
            raise UnverifiedAnswerError(
                f"the top answer ({answer.model}) was rejected: "
                f"{rejection_reason(climb.attempts[-1].verdicts) if climb.attempts else ''}",
                answer,
            )
        return answer

    async def _climb_rung(self, climb: _Climb, i: int, rung: RungConfig
                          ) -> tuple[Attempt, Any] | None:
        """Try one rung. Returns (attempt, parsed) when its answer is accepted."""
        attempt = Attempt(rung=i, model=rung.model, provider=rung.provider, name=rung.label,
                          endpoint=rung.base_url or "", status="running",
                          started_at=time.time())
        climb.attempts.append(attempt)
        estimate = self._estimate(rung, climb.request.messages, climb)
        remaining = climb.remaining_s()
        expected = _LATENCY.get(rung.endpoint)
        if remaining is not None and expected is not None and expected.mean_s > remaining:
            return self._skip(climb, attempt, f"deadline: {remaining:.2f}s left, this rung "
                              f"usually takes {expected.mean_s:.2f}s")
        if climb.over_cap(estimate):
            assert climb.max_cost_usd is not None
            return self._skip(climb, attempt, f"budget: estimated cost ${estimate:.6f} exceeds "
                              f"the ${climb.max_cost_usd - climb.spent_usd:.6f} left of "
                              f"max_cost_usd=${climb.max_cost_usd:g}")
        try:
            reservation = await self._budget.areserve(climb.request.metadata, estimate)
        except BudgetExceeded as e:
            if climb.candidate is None and not climb.attempts[:-1]:
                climb.attempts.pop()
                raise
            return self._skip(climb, attempt, f"budget: {e}")
        t0 = time.monotonic()
        call = rung_call(
            rung, climb.request.messages, output_type=climb.request.output_type,
            json_schema=climb.request.schema if climb.request.output_type is None else None,
        )
        actual = 0.0
        try:
            try:
                completion, used, tries, errors = await self._call_rung(call, rung, climb)
            except ProviderError as e:
                attempt.status = "error"
                _record_error(attempt, e)
                attempt.latency_ms = (time.monotonic() - t0) * 1000
                climb.skip_reasons.append(f"rung {i} ({rung.label}): {type(e).__name__}")
                return None
            _record_call(attempt, completion, used, tries, errors)
            # Charged before verifying: if the deadline cuts verification short, the model
            # call has still been paid for.
            actual = attempt.cost_usd
            climb.spent_usd += actual
            candidate = Candidate(text=completion.text, rung=used, rung_index=i,
                                  completion=completion, parsed=completion.parsed)
            before = climb.spent_usd
            verdicts, parsed = await self._verify(climb, candidate)
            attempt.verdicts = verdicts
            verifier_cost = sum(v.cost_usd for v in verdicts)
            attempt.cost_usd = actual + verifier_cost
            # Model calls of verifiers were charged (and settled) as they returned; a plugin
            # may also report a cost of its own in its verdict.
            unsettled = max(0.0, verifier_cost - (climb.spent_usd - before))
            climb.spent_usd += unsettled
            actual += unsettled
            attempt.latency_ms = (time.monotonic() - t0) * 1000
            ok = accepts(verdicts)
            attempt.status = "accepted" if ok else "rejected"
            climb.candidate = (attempt, parsed)
            return (attempt, parsed) if ok else None
        finally:
            await self._budget.asettle(reservation, actual)

    async def _shadow(self, climb: _Climb, accepted: Attempt) -> None:
        """Ask the top rung too and record whether it agrees with the accepted answer.

        Monitoring only: the accepted answer is still the one returned. Disagreement rates per
        rung show in ``cascade.health()``; when they climb above what tuning saw, traffic has
        drifted and the thresholds need re-tuning.
        """
        cfg = climb.config
        top = cfg.rungs[-1]
        attempt = Attempt(rung=len(cfg.rungs) - 1, model=top.model, provider=top.provider,
                          name=top.label, endpoint=top.base_url or "", status="shadow",
                          started_at=time.time())
        if climb.over_cap(self._estimate(top, climb.request.messages, climb)):
            return  # a shadow check never breaks the request's cap
        climb.attempts.append(attempt)
        t0 = time.monotonic()
        try:
            completion, used, tries, errors = await self._call_rung(
                rung_call(top, climb.request.messages), top, climb)
        except ProviderError as e:
            _record_error(attempt, e)
            return
        finally:
            attempt.latency_ms = (time.monotonic() - t0) * 1000
        _record_call(attempt, completion, used, tries, errors)
        climb.spent_usd += attempt.cost_usd
        agree = self._builtin("agreement", mode="previous",
                              normaliser=cfg.policy.shadow_normaliser)
        ctx = VerifyContext(request=climb.request, attempts=[accepted], candidate=Candidate(
            text=completion.text, rung=used, rung_index=len(cfg.rungs) - 1,
            completion=completion))
        [verdict] = await run_verifiers([BoundVerifier(id="shadow", verifier=agree)],
                                        lambda bv: ctx)
        attempt.verdicts = [verdict]
        stats = _SHADOW.setdefault(cfg.rungs[accepted.rung].endpoint, {"samples": 0,
                                                                      "disagreements": 0})
        stats["samples"] += 1
        stats["disagreements"] += 0 if verdict.passed else 1

    @staticmethod
    def _skip(climb: _Climb, attempt: Attempt, why: str) -> tuple[Attempt, Any] | None:
        """Record a rung that was not called; the climb goes on to the next one."""
        attempt.status, attempt.error, attempt.error_type = "skipped", why, "Skipped"
        climb.skip_reasons.append(f"rung {attempt.rung} ({attempt.model}) skipped: {why}")
        return None

    async def _verify(self, climb: _Climb, candidate: Candidate) -> tuple[list[Verdict], Any]:
        cfg = climb.config
        bound: list[BoundVerifier] = []
        rung_cfg = cfg.rungs[candidate.rung_index]
        ids = rung_cfg.verifiers if rung_cfg.verifiers is not None else list(self._verifiers)
        for vid in ids:
            vc, v = self._verifiers[vid]
            bound.append(BoundVerifier(id=vid, verifier=v, settings=dict(vc.settings),
                                       threshold=cfg.threshold(rung_cfg, vc),
                                       timeout_s=vc.timeout_s))
        if climb.request.schema is not None and not any(
            vc.name == "schema" for vc, _ in self._verifiers.values()
        ):
            bound.insert(0, BoundVerifier(id="schema", verifier=self._builtin("schema")))
        shared: dict[str, Any] = {}
        prior = [a for a in climb.attempts if a.rung != candidate.rung_index]

        async def caller(call: ModelCall, rung: RungConfig) -> Completion:
            return await self._verifier_call(call, rung, climb)

        def make_ctx(bv: BoundVerifier) -> VerifyContext:
            return VerifyContext(request=climb.request, candidate=candidate, attempts=prior,
                                 settings=bv.settings, threshold=bv.threshold,
                                 _caller=caller, shared=shared)

        verdicts = await run_verifiers(bound, make_ctx, short_circuit=cfg.policy.short_circuit)
        parsed = shared.get("parsed", candidate.parsed)
        return verdicts, parsed

    def _builtin(self, name: str, **settings: Any) -> Verifier:
        """A built-in verifier the engine adds itself (schema for ``schema=``, agreement for
        shadow checks), loaded once per Cascade."""
        key = (name, tuple(sorted(settings.items())))
        if key not in self._engine_verifiers:
            self._engine_verifiers[key] = load_verifier(VerifierConfig(name=name,
                                                                        settings=settings))
        return self._engine_verifiers[key]

    def _finish(self, climb: _Climb, accepted: tuple[Attempt, Any] | None, t0: float,
                key: str | None) -> Answer | None:
        chosen = accepted or climb.candidate
        if chosen is None:
            return None
        attempt, parsed = chosen
        return Answer(
            text=attempt.text or "", model=attempt.model, verified=accepted is not None,
            attempts=climb.attempts, parsed=parsed, cost_usd=climb.spent_usd,
            latency_ms=(time.monotonic() - t0) * 1000, cache_key=key,
            metadata=climb.request.metadata, request_id=uuid.uuid4().hex,
        )

    @functools.cached_property
    def _ladder_key(self) -> str:
        """The config's part of every cache key: the ladder and verifiers, hashed once."""
        verifiers = []
        for vc, v in self._verifiers.values():
            ident = vc.identity()
            if vc.name.startswith("<code>"):
                ident["code"] = _qualname(v)
            verifiers.append(ident)
        return cache_key({"rungs": [r.identity() for r in self.config.rungs],
                          "verifiers": verifiers})

    def _cache_key(self, request: Request) -> str:
        return cache_key({
            "messages": [m.to_dict() for m in request.messages],
            "schema": request.schema,
            "output_type": _qualname(request.output_type) if request.output_type else None,
            "ladder": self._ladder_key,
        })

    # ------------------------------------------------------------------ many, sync, close

    async def aanswer_many(self, requests: Sequence[str | Mapping[str, Any]], *,
                           concurrency: int = 8) -> list[Answer | Exception]:
        """Answer many requests with bounded concurrency; results in input order.

        Each item is a prompt string or a dict of ``aanswer`` keyword arguments. A request that
        fails yields its error in place (a typed CascadeError, or whatever a plugin raised);
        it never takes the others down.
        """
        if concurrency < 1:
            raise ConfigError("concurrency must be >= 1", source="request", key="concurrency")
        results: list[Answer | Exception | None] = [None] * len(requests)
        limiter = anyio.CapacityLimiter(concurrency)

        async def one(i: int, item: str | Mapping[str, Any]) -> None:
            async with limiter:
                try:
                    if isinstance(item, str):
                        results[i] = await self.aanswer(item)
                    else:
                        results[i] = await self.aanswer(**item)
                except Exception as e:
                    results[i] = e

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(requests):
                tg.start_soon(one, i, item)
        return [r for r in results if r is not None]

    def _blocking_portal(self) -> anyio.from_thread.BlockingPortal:
        """A private event loop on a daemon thread for the sync API.

        Not ``anyio.from_thread.start_blocking_portal``: its executor thread is joined at
        interpreter exit, so a program that never called ``close()`` would hang there.
        """
        with self._portal_lock:
            if self._portal is None:
                ready = threading.Event()
                box: list[anyio.from_thread.BlockingPortal] = []

                async def serve() -> None:
                    async with anyio.from_thread.BlockingPortal() as portal:
                        box.append(portal)
                        ready.set()
                        await portal.sleep_until_stopped()

                thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True,
                                          name="cascade-sync")
                thread.start()
                ready.wait()
                self._portal, self._portal_thread = box[0], thread
            return self._portal

    def _run_sync(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` on this object's loop; Ctrl-C cancels it there (no task left behind)."""
        future = self._blocking_portal().start_task_soon(fn)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            concurrent.futures.wait([future], timeout=5)
            raise

    def answer(self, prompt: str | None = None, **kw: Any) -> Answer:
        """The sync twin of :meth:`aanswer` (runs it on this object's event-loop thread)."""
        return self._run_sync(lambda: self.aanswer(prompt, **kw))

    def answer_many(self, requests: Sequence[str | Mapping[str, Any]], *,
                    concurrency: int = 8) -> list[Answer | Exception]:
        """The sync twin of :meth:`aanswer_many`."""
        return self._run_sync(lambda: self.aanswer_many(requests, concurrency=concurrency))

    async def aclose(self) -> None:
        with self._providers_lock:
            providers = list(self._providers.values())
            self._providers.clear()
        for p in providers:
            await p.aclose()

    def close(self) -> None:
        """Close connections, the sync API's event-loop thread and the cache."""
        portal, thread = self._portal, self._portal_thread
        self._portal = self._portal_thread = None
        try:
            if portal is not None:
                portal.call(self.aclose)  # providers made on that loop close on it
                portal.call(portal.stop)
        finally:
            if thread is not None:
                thread.join(10)
            if self._cache is not None:
                self._cache.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Cascade:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _record_call(attempt: Attempt, completion: Completion, used: RungConfig, tries: int,
                 failover_errors: Sequence[str]) -> None:
    """Write a model call's outcome into its attempt: who answered, what, and what it cost."""
    attempt.model, attempt.provider = used.model, used.provider
    attempt.endpoint = used.base_url or ""
    attempt.tries = tries
    if failover_errors:
        attempt.error = "failed over: " + " | ".join(failover_errors)
    attempt.text = completion.text
    attempt.finish_reason = completion.finish_reason
    attempt.input_tokens, attempt.output_tokens = completion.input_tokens, completion.output_tokens
    attempt.cost_usd = used.cost_usd(completion.input_tokens, completion.output_tokens)


def _record_error(attempt: Attempt, e: ProviderError) -> None:
    """Write why a call failed into its attempt: each endpoint tried, and why retries stopped."""
    attempt.error_type = type(e).__name__
    fo = getattr(e, "failover_errors", [])
    attempt.error = " | ".join(fo) if len(fo) > 1 else _short(e)
    notes = getattr(e, "__notes__", None)
    if notes:
        attempt.error += " (" + "; ".join(notes) + ")"
    attempt.tries = e.tries


def _short(e: BaseException, limit: int = 300) -> str:
    s = str(e)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _qualname(obj: Any) -> str:
    t = obj if isinstance(obj, type) else type(obj)
    if callable(obj) and not isinstance(obj, type) and hasattr(obj, "__qualname__"):
        t = obj
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}"


def _revive(parsed: Any, output_type: type[Any] | None) -> Any:
    if parsed is None or output_type is None or not hasattr(output_type, "model_validate"):
        return parsed
    return output_type.model_validate(parsed)


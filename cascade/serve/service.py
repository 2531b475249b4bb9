"""What every endpoint shares: the ladder, its clients, its observers, and one way to answer.

:meth:`Service.answer` is the one place a wire request becomes a climb: messages are
normalised (bad ones are a 400 before anything is spent), the client's budget key and cap are
applied, and per-request ``max_tokens`` / ``temperature`` / ``stop`` select a variant of the
ladder (the same config object per set of values, so the engine reuses what it built for it).
The engine tells every observer (metrics, spans, audit log) how each request and each shadow
check ended. Streams climb in the service's own task group, so a client that hangs up does not
cancel a climb that is being paid for: its answer is still cached and logged.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.trace import TracerProvider

from cascade.audit import AuditLog
from cascade.config import CascadeConfig, RungConfig
from cascade.engine import Cascade
from cascade.errors import ConfigError
from cascade.messages import normalise_messages
from cascade.observe import Observer
from cascade.providers.base import Provider
from cascade.serve.auth import Authenticator
from cascade.serve.config import ClientConfig, parse_server
from cascade.serve.errors import APIError
from cascade.serve.metrics import Metrics
from cascade.serve.protocol import ChatCompletionRequest
from cascade.telemetry import Telemetry
from cascade.trace import Answer, Attempt

__all__ = ["ClimbEvent", "Service"]

ClimbEvent = tuple[str, Any]
"""``("attempt", Attempt)`` as each rung finishes, then ``("answer", Answer)`` or
``("error", BaseException)``."""

_MAX_VARIANTS = 16


def _secret_envs(config: CascadeConfig, client_envs: Sequence[str]) -> list[str]:
    names = list(client_envs)
    for r in config.rungs:
        names += [e.api_key_env for e in (r, *r.fallbacks) if e.api_key_env]
    for v in config.verifiers:
        env = v.settings.get("api_key_env")
        if isinstance(env, str):
            names.append(env)
    return names


def _adjust(r: RungConfig, cap: int | None, temperature: float | None,
            stop: tuple[str, ...] | None) -> RungConfig:
    extra = dict(r.extra)
    if stop is not None:
        extra["stop_sequences" if r.provider == "anthropic" else "stop"] = list(stop)
    return replace(
        r, max_tokens=min(r.max_tokens, cap) if cap is not None else r.max_tokens,
        temperature=r.temperature if temperature is None else temperature, extra=extra,
        fallbacks=tuple(_adjust(f, cap, temperature, stop) for f in r.fallbacks))


class Service:
    """One ladder served over HTTP."""

    def __init__(self, config: CascadeConfig, *,
                 provider_factory: Callable[[RungConfig], Provider] | None = None,
                 tracer_provider: TracerProvider | None = None,
                 observers: Sequence[Observer] = ()) -> None:
        self.config = config
        self.server = parse_server(config)
        self.name = self.server.name
        self.auth = Authenticator(self.server.clients)
        s = self.server
        self.audit = AuditLog(
            s.audit_log, redact=s.audit_redact, max_bytes=s.audit_max_bytes,
            backups=s.audit_backups, ladder=self.name,
            secret_envs=_secret_envs(config, s.secret_envs)) if s.audit_log else None
        audit = self.audit
        self.metrics = Metrics(self.name,
                               audit_dropped=(lambda: audit.dropped) if audit else None)
        self.telemetry = Telemetry(ladder=self.name, tracer_provider=tracer_provider)
        # The engine tells every observer (and the audit log) how each request and each shadow
        # check ended, errors included.
        self.cascade = Cascade(config, provider_factory=provider_factory,
                               observers=[self.metrics, self.telemetry, *observers],
                               audit_log=self.audit)
        self._variants: OrderedDict[tuple[Any, ...], CascadeConfig] = OrderedDict()
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------ life cycle

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Attach the task group streams climb in (the app's lifespan owns it)."""
        self._tg = tg

    async def aclose(self) -> None:
        """Let shadow checks in flight finish (briefly), close connections, the cache and the
        audit log (the engine owns it and flushes it on close)."""
        drain = min(5.0, self.server.shutdown_timeout_s)
        await anyio.to_thread.run_sync(self.cascade.drain_shadows, drain)
        await self.cascade.aclose()
        await anyio.to_thread.run_sync(self.cascade.close)

    # ------------------------------------------------------------------ answering

    def _ladder(self, body: ChatCompletionRequest) -> CascadeConfig | None:
        """The ladder with this request's ``max_tokens`` / ``temperature`` / ``stop`` applied
        (None: the configured one). The same object per set of values, so the engine reuses
        what it built for it."""
        cap, temp = body.token_cap(), body.temperature
        stop = (body.stop,) if isinstance(body.stop, str) else (
            tuple(body.stop) if body.stop is not None else None)
        if cap is None and temp is None and stop is None:
            return None
        key = (cap, temp, stop)
        cfg = self._variants.get(key)
        if cfg is None:
            cfg = self._variants[key] = replace(
                self.config, rungs=tuple(_adjust(r, cap, temp, stop) for r in self.config.rungs))
            while len(self._variants) > _MAX_VARIANTS:
                self._variants.popitem(last=False)
        self._variants.move_to_end(key)
        return cfg

    def _metadata(self, body: ChatCompletionRequest,
                  client: ClientConfig | None) -> dict[str, Any]:
        meta: dict[str, Any] = dict(body.metadata or {})
        for reserved in ("client", "ladder", "request_id"):
            meta.pop(reserved, None)
        if client is not None:
            meta["budget_key"] = client.budget_key
            meta["client"] = client.name
        if body.user is not None:
            meta["user"] = body.user
        meta["ladder"] = self.name
        return meta

    async def answer(self, body: ChatCompletionRequest, client: ClientConfig | None, *,
                     on_attempt: Callable[[Attempt], Awaitable[None]] | None = None) -> Answer:
        """Climb for one wire request (the engine tells the observers how it ended)."""
        try:
            messages = normalise_messages(messages=body.messages)
        except ConfigError as e:
            raise APIError(400, e.detail, param="messages") from None
        caps = [c for c in (client.max_cost_usd if client else None, self.config.max_cost_usd)
                if c is not None]
        gauge = self.metrics.in_flight.labels(self.name)
        gauge.inc()
        try:
            return await self.cascade.aanswer(
                messages=messages, schema=body.output_schema(), config=self._ladder(body),
                metadata=self._metadata(body, client), max_cost_usd=min(caps) if caps else None,
                on_attempt=on_attempt)
        finally:
            gauge.dec()

    def stream(self, body: ChatCompletionRequest, client: ClientConfig | None
               ) -> MemoryObjectReceiveStream[ClimbEvent]:
        """Start a climb in the service's task group; its events arrive on the stream."""
        if self._tg is None:
            raise RuntimeError("the service is not running (no lifespan)")
        send: MemoryObjectSendStream[ClimbEvent]
        send, receive = anyio.create_memory_object_stream[ClimbEvent](math.inf)
        self._tg.start_soon(self._climb_into, send, body, client)
        return receive

    async def _climb_into(self, send: MemoryObjectSendStream[ClimbEvent],
                          body: ChatCompletionRequest, client: ClientConfig | None) -> None:
        async def progress(a: Attempt) -> None:
            # A client that hung up closed the stream; the climb goes on and is still logged.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(("attempt", a))

        with send:
            event: ClimbEvent
            try:
                event = ("answer", await self.answer(body, client, on_attempt=progress))
            except Exception as e:
                event = ("error", e)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(event)

    # ------------------------------------------------------------------ health, feedback

    async def health(self) -> Mapping[str, Any]:
        """Endpoints (circuits, latency) and the drift alarm per rung."""
        return await self.cascade.ahealth()

    async def feedback(self, request_id: str, correct: bool, expected: str | None,
                       client: ClientConfig | None) -> None:
        await self.cascade.afeedback(request_id, correct, expected,
                                     client=client.name if client else None)

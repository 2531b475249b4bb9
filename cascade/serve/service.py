"""What every endpoint shares: the ladder, its clients, its observers, and one way to answer.

:meth:`Service.answer` is the one place a wire request becomes a climb: messages are
normalised (bad ones are a 400 before anything is spent), the client's budget key and cap are
applied, and per-request ``max_tokens`` / ``temperature`` / ``stop`` select a variant of the
ladder (the same config object per set of values, so the engine reuses what it built for it).
The engine tells every observer (metrics, spans, audit log) how each request and each shadow
check ended. Streams climb in the service's own task group, so a client that hangs up does not
cancel a climb that is being paid for: its answer is still cached and logged.

A reload (:meth:`Service.reload`: SIGHUP, a changed file, see :mod:`cascade.serve.reload`)
builds a whole new :class:`Loaded` (engine, clients, audit log) beside the one serving, swaps it
in for new requests only when it built, and closes the old one after its last request; a file
that does not load leaves the old config serving and says why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.trace import TracerProvider

from cascade.audit import AuditLog
from cascade.config import CascadeConfig, RungConfig, load_config
from cascade.engine import Cascade, propagates
from cascade.errors import CascadeError, ConfigError
from cascade.messages import normalise_messages
from cascade.observe import Observer
from cascade.providers.base import Provider
from cascade.secrets import secret_envs_of
from cascade.serve.auth import Authenticator
from cascade.serve.config import ClientConfig, ServerConfig, parse_server
from cascade.serve.errors import APIError
from cascade.serve.metrics import Metrics
from cascade.serve.protocol import ChatCompletionRequest
from cascade.serve.reload import (
    ReloadStatus,
    config_path,
    now_iso,
    on_sighup,
    watch,
    watched_files,
)
from cascade.telemetry import Telemetry
from cascade.tokens import warm_up
from cascade.trace import Answer, Attempt

__all__ = ["ClimbEvent", "Loaded", "Service"]

log = logging.getLogger("cascade.serve")

ClimbEvent = tuple[str, Any]
"""``("attempt", Attempt)`` as each rung finishes, then ``("answer", Answer)`` or
``("error", BaseException)``."""

_MAX_VARIANTS = 16


def _adjust(r: RungConfig, cap: int | None, temperature: float | None,
            stop: tuple[str, ...] | None) -> RungConfig:
    """The rung for a request's own settings. Its stop sequences join the rung's (which are
    sent with every call: an end marker a model needs must not be dropped by a client's)."""
    return replace(
        r, max_tokens=min(r.max_tokens, cap) if cap is not None else r.max_tokens,
        temperature=r.temperature if temperature is None else temperature,
        stop=tuple(dict.fromkeys((*r.stop, *stop))) if stop is not None else r.stop,
        fallbacks=tuple(_adjust(f, cap, temperature, stop) for f in r.fallbacks))


SETTLE_KEPT_EVERY_S = 5.0
"""How often a worker records the spend it kept during a shared-store outage."""


class Loaded:
    """One loaded config: its engine, clients, audit log and ladder variants. A request keeps
    the one it started on to its end, so a reload never changes a climb half-way."""

    def __init__(self, config: CascadeConfig, *,
                 provider_factory: Callable[[RungConfig], Provider] | None,
                 observers: Sequence[Observer], require_clients: bool = False) -> None:
        self.config = config
        self.server = s = parse_server(config)
        if require_clients and not s.clients:
            # Bound beyond loopback: a file with no keys (first or reloaded) would hand the
            # ladder's spending to anyone who can reach the port.
            raise ConfigError("this service is bound beyond loopback, so it needs client keys "
                              "(a config with no [[server.clients]] is refused; restart on "
                              "127.0.0.1 or with --insecure to serve without)",
                              source=config.source, key="server.clients")
        self.name = s.name
        self.auth = Authenticator(s.clients)
        self.audit = AuditLog(
            s.audit_log, redact=s.audit_redact, max_bytes=s.audit_max_bytes,
            backups=s.audit_backups, ladder=self.name,
            secret_envs=[*s.secret_envs, *secret_envs_of(config)]) if s.audit_log else None
        try:
            # The engine tells every observer (and the audit log) how each request and each
            # shadow check ended, errors included.
            self.cascade = Cascade(config, provider_factory=provider_factory,
                                   observers=list(observers), audit_log=self.audit)
        except BaseException:
            if self.audit is not None:
                self.audit.close()
            raise
        self._variants: OrderedDict[tuple[Any, ...], CascadeConfig] = OrderedDict()
        self.in_flight = 0
        self._idle: anyio.Event | None = None

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Count a request in flight on this config (a retired one closes once none is)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def wait_idle(self) -> None:
        while self.in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def aclose(self, drain_s: float) -> None:
        """Let shadow checks in flight finish (briefly), close connections, the cache and the
        audit log (the engine owns it and flushes it on close)."""
        await anyio.to_thread.run_sync(self.cascade.drain_shadows, drain_s)
        await self.cascade.aclose()
        await anyio.to_thread.run_sync(self.cascade.close)

    def ladder(self, body: ChatCompletionRequest) -> CascadeConfig | None:
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


class Service:
    """One ladder served over HTTP; its config can be reloaded while it serves.

    ``config``, ``name``, ``auth``, ``audit`` and ``cascade`` are those of the config in use
    now (:attr:`live`); a reload swaps in a new :class:`Loaded` for new requests, and the old
    one is closed once the requests that started on it have finished.
    """

    def __init__(self, config: CascadeConfig, *, path: str | os.PathLike[str] | None = None,
                 provider_factory: Callable[[RungConfig], Provider] | None = None,
                 tracer_provider: TracerProvider | None = None,
                 observers: Sequence[Observer] = (), require_clients: bool = False) -> None:
        self.path = config_path(path) if path is not None else None
        self._provider_factory = provider_factory
        self._require_clients = require_clients
        """Bound beyond loopback without --insecure: every config it loads needs clients."""
        name = parse_server(config).name
        self._retiring: set[Loaded] = set()
        self._dropped_closed = 0
        """Audit lines dropped by replaced configs' logs (the counter never goes down)."""
        self.metrics = Metrics(name, audit_dropped=self._audit_dropped)
        self.telemetry = Telemetry(ladder=name, tracer_provider=tracer_provider)
        self._observers: tuple[Observer, ...] = (self.metrics, self.telemetry, *observers)
        self.live = self._load(config)
        self.status = ReloadStatus(source=str(self.path) if self.path else None,
                                   loaded_at=now_iso())
        self._reloading: anyio.Lock | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    def _load(self, config: CascadeConfig) -> Loaded:
        return Loaded(config, provider_factory=self._provider_factory, observers=self._observers,
                      require_clients=self._require_clients)

    def _audit_dropped(self) -> int:
        dropped = self._dropped_closed + sum(x.audit.dropped for x in self._retiring
                                             if x.audit is not None)
        live: Loaded | None = getattr(self, "live", None)  # None while the first one loads
        audit = live.audit if live is not None else None
        return dropped + (audit.dropped if audit is not None else 0)

    @property
    def config(self) -> CascadeConfig:
        return self.live.config

    @property
    def server(self) -> ServerConfig:
        return self.live.server

    @property
    def name(self) -> str:
        return self.live.name

    @property
    def auth(self) -> Authenticator:
        return self.live.auth

    @property
    def audit(self) -> AuditLog | None:
        return self.live.audit

    @property
    def cascade(self) -> Cascade:
        return self.live.cascade

    # ------------------------------------------------------------------ life cycle

    async def run(self, tg: anyio.abc.TaskGroup, *, sighup: bool = False) -> None:
        """Attach the task group streams climb in (the app's lifespan owns it), and start
        watching the config file (and SIGHUP when ``sighup``)."""
        self._tg = tg
        self._reloading = anyio.Lock()
        cfg, clients = self.config, self.server.clients
        if (cfg.max_cost_usd is not None or cfg.budget.limit_usd is not None
                or any(c.max_cost_usd is not None for c in clients)):
            # Costs are estimated with tiktoken: its ~0.6 s load is start-up's, not the
            # first request's.
            await anyio.to_thread.run_sync(warm_up, [r.model for r in cfg.rungs])
        tg.start_soon(self._settle_kept)
        if self.path is None:
            return
        path = self.path
        if sighup:
            tg.start_soon(on_sighup, lambda: self._reload_guarded("sighup"))
        tg.start_soon(watch, lambda: watched_files(path, self.config),
                      lambda: self.server.reload_poll_s,
                      lambda: self._reload_guarded("file changed"))

    async def _settle_kept(self) -> None:
        """Every few seconds, what this worker kept while Redis was down is recorded once it
        answers, traffic or not (a worker clients are not pinned to held it for minutes)."""
        while True:
            await anyio.sleep(SETTLE_KEPT_EVERY_S)
            await self.live.cascade.asettle_kept()

    async def _reload_guarded(self, trigger: str) -> None:
        """A reload from a signal or the watch: a bug in it is logged, never the end of the
        server."""
        try:
            await self.reload(trigger)
        except Exception:
            log.exception("config reload (%s) failed unexpectedly; the config in use stays",
                          trigger)

    async def reload(self, trigger: str = "api") -> bool:
        """Load the config file again and swap it in; False (the old config still serving,
        the reason in :attr:`status` and the log) when the new one does not load."""
        if self.path is None:
            raise RuntimeError("this service was given a config object: there is no file to "
                               "reload (create_app(PATH) or cascade serve --config PATH)")
        if self._reloading is None:
            raise RuntimeError("the service is not running (no lifespan)")
        path = self.path
        async with self._reloading:
            try:
                new = await anyio.to_thread.run_sync(lambda: self._load(load_config(path)))
            except Exception as e:
                self.status.failed(trigger, e)
                self.metrics.config_reloads.labels("error").inc()
                log.warning("config reload (%s) refused, the old config keeps serving: %s",
                            trigger, self.status.last_reload_error)
                return False
            old, self.live = self.live, new
            self.metrics.ladder = self.telemetry.ladder = new.name
            self.status.succeeded(trigger)
            self.metrics.config_reloads.labels("ok").inc()
            log.warning("config reloaded (%s) from %s: ladder %r, %d rung(s)", trigger, path,
                        new.name, len(new.config.rungs))
            self._retiring.add(old)
            assert self._tg is not None
            self._tg.start_soon(self._retire, old)
            return True

    async def _retire(self, old: Loaded) -> None:
        """Close a replaced config once every request that started on it has finished (cut
        short by shutdown, it stays in ``_retiring`` and :meth:`aclose` closes it)."""
        await old.wait_idle()
        with anyio.CancelScope(shield=True):
            await old.aclose(min(5.0, old.server.shutdown_timeout_s))
            self._dropped_closed += old.audit.dropped if old.audit is not None else 0
            self._retiring.discard(old)

    async def aclose(self) -> None:
        """Close the config in use and any replaced one not closed yet."""
        for x in (*self._retiring, self.live):
            await x.aclose(min(5.0, x.server.shutdown_timeout_s))
        self._retiring.clear()

    # ------------------------------------------------------------------ answering

    @staticmethod
    def _metadata(body: ChatCompletionRequest, client: ClientConfig | None,
                  ladder: str) -> dict[str, Any]:
        meta: dict[str, Any] = dict(body.metadata or {})
        for reserved in ("client", "ladder", "request_id"):
            meta.pop(reserved, None)
        if client is not None:
            meta["budget_key"] = client.budget_key
            meta["client"] = client.name
        if body.user is not None:
            meta["user"] = body.user
        meta["ladder"] = ladder
        return meta

    async def answer(self, body: ChatCompletionRequest, client: ClientConfig | None, *,
                     on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
                     request_id: str | None = None) -> Answer:
        """Climb for one wire request (the engine tells the observers how it ended)."""
        try:
            messages = normalise_messages(messages=body.messages)
        except ConfigError as e:
            raise APIError(400, e.detail, param="messages") from None
        live = self.live  # this request's config to its end, whatever a reload swaps in
        caps = [c for c in (client.max_cost_usd if client else None, live.config.max_cost_usd)
                if c is not None]
        gauge = self.metrics.in_flight.labels(live.name)
        gauge.inc()
        try:
            with live.using():
                return await live.cascade.aanswer(
                    messages=messages, schema=body.output_schema(),
                    schema_options=body.schema_options(), config=live.ladder(body),
                    metadata=self._metadata(body, client, live.name),
                    max_cost_usd=min(caps) if caps else None, on_attempt=on_attempt,
                    request_id=request_id)
        except ConfigError as e:
            if e.key is None or not e.key.startswith("schema"):
                raise
            # the engine's argument; the client sent it inside the response format
            param = ("response_format.json_schema." + e.key.removeprefix("schema_options.")
                     if e.key.startswith("schema_options.") else
                     "response_format.json_schema.schema")
            raise APIError(400, e.detail, param=param) from None
        except BaseException as e:
            if isinstance(e, Exception) or propagates(e):
                raise
            # SystemExit (or the like) from a plugin: one request's failure. Escaping a stream's
            # climb it would cancel the service's task group, every request and the lifespan.
            log.error("a plugin raised %s answering a request", type(e).__name__, exc_info=e)
            raise CascadeError(f"a plugin raised {type(e).__name__}: {e}") from None
        finally:
            gauge.dec()

    def stream(self, body: ChatCompletionRequest, client: ClientConfig | None, request_id: str
               ) -> MemoryObjectReceiveStream[ClimbEvent]:
        """Start a climb in the service's task group; its events arrive on the stream. The
        request id is chosen here: a response that starts before the answer sends it."""
        if self._tg is None:
            raise RuntimeError("the service is not running (no lifespan)")
        send: MemoryObjectSendStream[ClimbEvent]
        send, receive = anyio.create_memory_object_stream[ClimbEvent](math.inf)
        self._tg.start_soon(self._climb_into, send, body, client, request_id)
        return receive

    async def _climb_into(self, send: MemoryObjectSendStream[ClimbEvent],
                          body: ChatCompletionRequest, client: ClientConfig | None,
                          request_id: str) -> None:
        async def progress(a: Attempt) -> None:
            # A client that hung up closed the stream; the climb goes on and is still logged.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(("attempt", a))

        with send:
            event: ClimbEvent
            try:
                event = ("answer", await self.answer(body, client, on_attempt=progress,
                                                     request_id=request_id))
            except Exception as e:
                event = ("error", e)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(event)

    # ------------------------------------------------------------------ health, feedback

    async def health(self) -> Mapping[str, Any]:
        """Endpoints (circuits, latency), the drift alarm per rung, and the config's reloads."""
        return {**await self.cascade.ahealth(), "config": self.status.to_dict()}

    async def feedback(self, request_id: str, correct: bool, expected: str | None,
                       client: ClientConfig | None) -> None:
        await self.cascade.afeedback(request_id, correct, expected,
                                     client=client.name if client else None)

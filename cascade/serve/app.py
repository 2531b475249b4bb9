"""The ASGI app: wires the endpoint routers to one :class:`Service`, and nothing else.

``create_app(config)`` for code and tests; ``app_factory`` for uvicorn's ``--factory`` import
string (``cascade serve --workers N`` starts each worker with it, the config path in
``$CASCADE_SERVE_CONFIG``). Given a path, the app reloads the file when it changes (and on
SIGHUP with ``sighup=True``, as ``cascade serve`` asks): see :mod:`cascade.serve.reload`.

A worker of ``--workers N`` that starts while the file does not load (one respawned after a
worker died, the file gone bad since it last loaded) serves the last config that loaded, as
its siblings do: the supervisor keeps that file's text in ``$CASCADE_SERVE_LAST_GOOD``. The
worker logs a warning, and ``/healthz`` shows the file's error as a refused reload's; the next
good reload swaps the file in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.trace import TracerProvider
from starlette.exceptions import HTTPException

from cascade.config import CascadeConfig, RungConfig, load_config
from cascade.errors import ConfigError
from cascade.observe import Observer
from cascade.providers.base import Provider
from cascade.serve import chat, feedback, health, messages_api, metrics, models
from cascade.serve.errors import APIError, from_exception
from cascade.serve.reload import config_path, describe, parse_text
from cascade.serve.service import Service

__all__ = ["CONFIG_ENV", "LAST_GOOD_ENV", "REQUIRE_CLIENTS_ENV", "app_factory", "create_app"]

log = logging.getLogger("cascade.serve")

CONFIG_ENV = "CASCADE_SERVE_CONFIG"
REQUIRE_CLIENTS_ENV = "CASCADE_SERVE_REQUIRE_CLIENTS"
"""Set to 1 by ``cascade serve`` for workers bound beyond loopback without ``--insecure``."""
LAST_GOOD_ENV = "CASCADE_SERVE_LAST_GOOD"
"""Set by ``cascade serve --workers N``: a private file holding the text of the config file as
it was when it last loaded in the supervisor (at start, then each SIGHUP or change that
loaded), for a worker that starts while the file is bad."""


def create_app(config: CascadeConfig | str | os.PathLike[str], *,
               provider_factory: Callable[[RungConfig], Provider] | None = None,
               tracer_provider: TracerProvider | None = None,
               observers: Sequence[Observer] = (), sighup: bool = False,
               require_clients: bool = False) -> FastAPI:
    """An app serving ``config``'s ladder (validates ``[server]`` now: bad config fails here).

    Given a file, the app reloads it when it changes and, with ``sighup``, on SIGHUP (the
    handler needs the main thread: ``cascade serve`` passes it; an embedding app decides).
    ``require_clients`` (bound beyond loopback) refuses any config, first or reloaded, that
    has no ``[[server.clients]]``.
    """
    path = None if isinstance(config, CascadeConfig) else config_path(config)
    cfg = load_config(path) if path is not None else config
    assert isinstance(cfg, CascadeConfig)
    service = Service(cfg, path=path, provider_factory=provider_factory,
                      tracer_provider=tracer_provider, observers=observers,
                      require_clients=require_clients)
    return _app(service, sighup=sighup)


def _app(service: Service, *, sighup: bool) -> FastAPI:

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as tg:
                await service.run(tg, sighup=sighup)
                yield
                # Connections have drained (or timed out): climbs of clients that hung up
                # are cut now; what they spent is settled by the engine.
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await service.aclose()

    app = FastAPI(title=f"cascade: {service.name}", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.service = service
    for module in (chat, messages_api, models, health, metrics, feedback):
        app.include_router(module.router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        type=kind, headers=e.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return APIError(400, f"{loc}: {err.get('msg', 'invalid')}", param=loc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        return from_exception(e).response()

    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory cascade.serve.app:app_factory``: the config from
    ``$CASCADE_SERVE_CONFIG``."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"set {CONFIG_ENV} to the config file to serve", source="environment",
                          key=CONFIG_ENV)
    from cascade.serve.cli import exit_with_parent, ignore_sighup

    ignore_sighup()  # a worker: until its lifespan takes SIGHUP over (a reload)
    exit_with_parent()
    source = config_path(path)
    require_clients = os.environ.get(REQUIRE_CLIENTS_ENV) == "1"
    try:
        return create_app(source, sighup=True, require_clients=require_clients)
    except Exception as error:
        last_good = os.environ.get(LAST_GOOD_ENV)
        if not last_good:
            raise
        # The file went bad after it last loaded (its siblings refused it and serve on): dying
        # here would only have the supervisor start another worker that dies the same way.
        # Parsed as the file itself (its relative paths are the file's); if this fails too,
        # the error says so after the file's.
        config = parse_text(Path(last_good).read_text(encoding="utf-8"), source)
        service = Service(config, path=source, require_clients=require_clients)
        service.status.failed("worker start", error)
        service.metrics.config_reloads.labels("error").inc()
        log.warning("worker start: %s does not load, this worker serves the last config that "
                    "loaded, as the others do, until a reload: %s", source, describe(error))
        return _app(service, sighup=True)

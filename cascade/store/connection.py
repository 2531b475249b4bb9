"""One Redis connection pool per process (and event loop), a time limit on every call, and a
memory of outages so a dead Redis costs one timeout, not one per request.

Every call goes through :meth:`Connection.run`: it is bounded by ``[store] timeout_s`` and, being
an ordinary await, by the request's own deadline (its cancel scope). Any failure (refused,
reset, timed out, a Redis error) becomes :class:`StoreDown`; for the next second calls fail at
once with the same error instead of waiting again, then Redis is tried anew, so a store that
comes back is used again without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from cascade.store.config import StoreConfig

__all__ = ["Connection", "StoreDown"]

log = logging.getLogger("cascade")
_T = TypeVar("_T")
_RETRY_AFTER_S = 1.0
"""After a failure, calls fail fast for this long before Redis is tried again."""


class StoreDown(Exception):
    """Redis could not be used for one call; ``reason`` says why (never a secret).

    ``sent`` is False when the call failed fast, without reaching Redis at all: then nothing
    it would have changed can have happened there (a caller need not undo it later).
    """

    def __init__(self, reason: str, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


class _Pool:
    """A client of one event loop, shared by every store of the process using the same
    settings, closed when the last of them closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Redis) -> None:
        self.loop = loop
        self.client = client
        self.users = 0
        self.scripts: dict[str, AsyncScript] = {}


_pools: dict[tuple[Any, ...], _Pool] = {}
_pools_lock = threading.Lock()


class Connection:
    """Redis for one store: the process's pool, timeouts, scripts, outage bookkeeping."""

    def __init__(self, cfg: StoreConfig, *, password: str | None = None) -> None:
        self.cfg = cfg
        self._password = password
        self._acquired: dict[int, tuple[tuple[Any, ...], _Pool]] = {}
        self._retry_at = 0.0
        self._down_reason: str | None = None

    @property
    def down(self) -> bool:
        """True while the last call failed (until a call succeeds again)."""
        return self._down_reason is not None

    def _pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        mine = self._acquired.get(id(loop))
        if mine is not None and mine[1].loop is loop:
            return mine[1]
        cfg = self.cfg
        key = (cfg.url, cfg.password_env, cfg.timeout_s, cfg.max_connections, os.getpid(),
               id(loop))
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None or pool.loop is not loop:
                connections = BlockingConnectionPool.from_url(
                    cfg.url, max_connections=cfg.max_connections, timeout=cfg.timeout_s,
                    password=self._password, socket_timeout=cfg.timeout_s,
                    socket_connect_timeout=cfg.timeout_s, decode_responses=True,
                    # one immediate retry replaces a pooled connection Redis dropped (a
                    # restart); the outage memory below handles the rest
                    retry=Retry(NoBackoff(), 1), health_check_interval=30,
                    client_name="verified-cascade",
                )
                pool = _pools[key] = _Pool(loop, Redis.from_pool(connections))
            pool.users += 1
        self._acquired[id(loop)] = (key, pool)
        return pool

    def script(self, name: str, source: str) -> AsyncScript:
        """A Lua script registered once per client (EVALSHA, loaded again after a flush)."""
        pool = self._pool()
        s = pool.scripts.get(name)
        if s is None:
            s = pool.scripts[name] = pool.client.register_script(source)
        return s

    async def run(self, fn: Callable[[Redis], Awaitable[_T]]) -> _T:
        """``fn(client)`` within ``timeout_s``, or :class:`StoreDown`."""
        if self._down_reason is not None and time.monotonic() < self._retry_at:
            raise StoreDown(self._down_reason, sent=False)
        try:
            client = self._pool().client
            with anyio.fail_after(self.cfg.timeout_s):
                result = await fn(client)
        except (RedisError, OSError) as e:  # TimeoutError (ours or a socket's) is an OSError
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if self._down_reason is None:
                log.warning("shared store %s is unreachable (%s); falling back until it is "
                            "back", self.cfg.display_url, reason)
            self._down_reason = reason
            self._retry_at = time.monotonic() + _RETRY_AFTER_S
            raise StoreDown(reason) from None
        if self._down_reason is not None:
            log.warning("shared store %s is reachable again", self.cfg.display_url)
            self._down_reason = None
        return result

    async def aclose(self) -> None:
        """Give this store's share of the pools back; the last user disconnects them."""
        acquired, self._acquired = self._acquired, {}
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for key, pool in acquired.values():
            with _pools_lock:
                pool.users -= 1
                last = pool.users <= 0
                if last and _pools.get(key) is pool:
                    del _pools[key]
            if last and pool.loop is loop:
                await pool.client.aclose()

"""The shared store: cache, budgets, breakers, latency and counters in one Redis.

``[store] url = "redis://HOST:PORT/DB"`` gives every worker using the config the same state:

- **cache**: the disk cache's keys and entry format (:func:`cascade.cache.pack_entry`: JSON,
  the key inside, an HMAC under the cache's secret), verified answers only, the same TTL;
- **budgets**: :mod:`cascade.store.redis_budgets`;
- **breakers**: one hash per endpoint; a circuit opened by any worker is open for all on their
  next check, and after the cool-down exactly one worker wins the probe (``SET NX PX``);
- **latency**: an exponentially weighted mean per endpoint, updated in Redis and mirrored in
  memory, so :meth:`RedisLatency.mean_s` (on the hot path) does no I/O;
- **counters and flags** (shadow samples, drift alarms).

When Redis is unreachable no call waits past ``[store] timeout_s`` (nor the request deadline):
the cache raises :class:`CacheError`, which the engine turns into a bypass with a warning in
the answer (a verified answer it could not store is still returned), breakers fall back
to this process's own, latency and counters stay local, and budgets fail closed (or open, if
configured). Everything uses Redis again as soon as it answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

from cascade.breaker import CircuitBreakers, breakers_for, circuit_open_error, counts_as_failure
from cascade.cache import DamagedEntry, pack_entry, unpack_entry
from cascade.config import BreakerConfig, CascadeConfig
from cascade.errors import CacheError, CircuitOpen, ConfigError, ProviderError
from cascade.store import lua
from cascade.store.base import Store
from cascade.store.config import StoreConfig, parse_store, secret_from_env
from cascade.store.connection import Connection, StoreDown
from cascade.store.local import LocalCounters
from cascade.store.redis_budgets import RedisBudgets
from cascade.trace import Answer

__all__ = ["RedisBreakers", "RedisCache", "RedisCounters", "RedisLatency", "RedisStore"]

log = logging.getLogger("cascade")


class RedisCache:
    """Verified answers in Redis under the disk cache's keys, with a TTL."""

    def __init__(self, conn: Connection, *, ttl_s: float | None = None,
                 secret: bytes | None = None) -> None:
        self._conn = conn
        self._prefix = f"{conn.cfg.key_prefix}:cache:"
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._secret = secret
        self._bypassed = False

    async def secret(self) -> bytes:
        """The cache's HMAC secret: from ``cache_secret_env``, else created in Redis with the
        cache (``SET NX``: every worker ends up with the first one written)."""
        if self._secret is None:
            key, fresh = self._prefix + "secret", secrets.token_hex(32)

            async def get_or_create(c: Any) -> str:
                await c.set(key, fresh, nx=True)
                return str(await c.get(key))

            self._secret = bytes.fromhex(await self._conn.run(get_or_create))
        return self._secret

    def _bypass(self, why: str) -> None:
        if not self._bypassed:
            log.warning("shared cache bypassed: %s is unreachable (%s)",
                        self._conn.cfg.display_url, why)
        self._bypassed = True

    async def aget(self, key: str) -> Answer | None:
        """The stored answer, or None (a miss, or a damaged entry, deleted). Raises
        :class:`CacheError` while Redis is down: the engine bypasses a shared cache then and
        says so in the answer's warnings."""
        try:
            secret = await self.secret()
            raw = await self._conn.run(lambda c: c.get(self._prefix + key))
        except StoreDown as e:
            self._bypass(e.reason)
            raise CacheError(f"the shared cache at {self._conn.cfg.display_url} is "
                             f"unreachable ({e.reason})") from None
        self._bypassed = False
        if raw is None:
            return None
        try:
            return unpack_entry(key, raw, secret)
        except DamagedEntry as e:
            log.warning("shared cache entry %s… was damaged (%s): dropped", key[:12], e)
            with contextlib.suppress(StoreDown):
                await self._conn.run(lambda c: c.delete(self._prefix + key))
            return None

    async def aset(self, key: str, answer: Answer) -> None:
        """Store a verified answer (ValueError for an unverified one); CacheError if Redis is
        down, so the caller returns the answer it paid for with a warning."""
        if not answer.verified:
            raise ValueError("only verified answers are cached")
        try:
            secret = await self.secret()
            body = json.dumps(pack_entry(key, answer, secret), separators=(",", ":"))
            await self._conn.run(lambda c: c.set(self._prefix + key, body, px=self._ttl_ms))
        except StoreDown as e:
            self._bypass(e.reason)
            raise CacheError(f"the shared cache at {self._conn.cfg.display_url} is "
                             f"unreachable ({e.reason}); the answer was not cached") from None

    async def aclose(self) -> None:
        return None


class RedisBreakers:
    """Circuit breakers whose state every worker shares; this process's own while Redis is
    down (every outcome is recorded in both, so the fallback starts warm)."""

    def __init__(self, conn: Connection, config: BreakerConfig) -> None:
        self._conn = conn
        self._prefix = conn.cfg.key_prefix
        self.local: CircuitBreakers = breakers_for(config)
        self._threshold = self.local.failure_threshold
        self._cooldown_ms = max(1, int(self.local.cooldown_s * 1000))
        self._keep_ms = max(10 * self._cooldown_ms, 600_000)

    def _keys(self, endpoint: str) -> list[str]:
        return [f"{self._prefix}:breaker:{endpoint}", f"{self._prefix}:probe:{endpoint}"]

    async def acheck(self, endpoint: str) -> bool:
        script = self._conn.script("breaker_check", lua.BREAKER_CHECK)
        try:
            code, ms = await self._conn.run(lambda c: script(
                keys=self._keys(endpoint), args=[self._cooldown_ms], client=c))
        except StoreDown:
            return self.local.check(endpoint)
        if code == 0:
            return False
        if code == 1:
            return True
        if code == 2:
            raise circuit_open_error(endpoint, f"(shared by every worker); next probe in "
                                               f"{int(ms) / 1000:.1f}s")
        raise circuit_open_error(endpoint, "a probe request is in flight (in some worker)")

    async def arecord(self, endpoint: str, err: BaseException | None) -> None:
        self.local.record(endpoint, err)
        if isinstance(err, CircuitOpen):
            return  # that call never reached the endpoint
        keys = self._keys(endpoint)
        try:
            if counts_as_failure(err):
                script = self._conn.script("breaker_failure", lua.BREAKER_FAILURE)
                await self._conn.run(lambda c: script(
                    keys=keys, args=[self._threshold, self._cooldown_ms, self._keep_ms],
                    client=c))
            elif err is None or isinstance(err, ProviderError):
                await self._conn.run(lambda c: c.delete(*keys))  # it answered: close
            else:
                await self._conn.run(lambda c: c.delete(keys[1]))  # told nothing: free probe
        except StoreDown:
            pass

    async def asnapshot(self) -> dict[str, dict[str, Any]]:
        """Every endpoint with failures on record in Redis (``opened_at`` in Unix seconds)."""
        literal = f"{self._prefix}:breaker:"
        # glob characters of the prefix match literally: another deployment's keys stay out
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", literal) + "*"

        async def read(c: Any) -> dict[str, dict[str, Any]]:
            sec, usec = await c.time()
            now = sec + usec / 1e6
            out: dict[str, dict[str, Any]] = {}
            async for k in c.scan_iter(match=pattern, count=500):
                endpoint = k[len(literal):]
                h = await c.hgetall(k)
                if not h:
                    continue
                opened = int(h["opened"]) / 1000 if "opened" in h else None
                cool = self._cooldown_ms / 1000
                until = None if opened is None else max(0.0, opened + cool - now)
                state = "closed" if opened is None else ("open" if until else "half_open")
                out[endpoint] = {
                    "state": state, "consecutive_failures": int(h.get("failures", 0)),
                    "opened_at": opened, "seconds_until_probe": until,
                    "probe_in_flight": bool(await c.exists(self._keys(endpoint)[1])),
                }
            return dict(sorted(out.items()))

        try:
            return await self._conn.run(read)
        except StoreDown:
            return self.local.snapshot()


class RedisLatency:
    """Observed latency per endpoint, kept in Redis and mirrored here for reads without I/O."""

    _REFRESH_S = 5.0

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._prefix = f"{conn.cfg.key_prefix}:latency:"
        self._lock = threading.Lock()
        self._known: dict[str, tuple[int, int, float]] = {}
        self._refreshed = 0.0

    def _local(self, endpoint: str, seconds: float, failed: bool) -> None:
        with self._lock:
            calls, failures, mean = self._known.get(endpoint, (0, 0, 0.0))
            if failed:
                failures += 1
            else:
                calls += 1
                mean += (0.2 if calls > 1 else 1.0) * (seconds - mean)
            self._known[endpoint] = (calls, failures, mean)

    async def aobserve(self, endpoint: str, seconds: float, *, failed: bool = False) -> None:
        script = self._conn.script("latency_observe", lua.LATENCY_OBSERVE)
        try:
            calls, failures, mean = await self._conn.run(lambda c: script(
                keys=[self._prefix + endpoint, self._prefix + "index"],
                args=[repr(float(seconds)), "1" if failed else "0", endpoint], client=c))
        except StoreDown:
            self._local(endpoint, seconds, failed)
            return
        with self._lock:
            self._known[endpoint] = (int(calls), int(failures), float(mean))
        if time.monotonic() - self._refreshed > self._REFRESH_S:
            await self.arefresh()

    async def arefresh(self) -> None:
        """Read every endpoint's figures from Redis (what other workers observed too)."""
        async def read(c: Any) -> dict[str, tuple[int, int, float]]:
            endpoints = sorted(await c.smembers(self._prefix + "index"))
            pipe = c.pipeline(transaction=False)
            for ep in endpoints:
                pipe.hgetall(self._prefix + ep)
            rows = await pipe.execute()
            return {ep: (int(h.get("calls", 0)), int(h.get("failures", 0)),
                         float(h.get("mean", 0.0))) for ep, h in zip(endpoints, rows, strict=True)
                    if h}

        self._refreshed = time.monotonic()
        try:
            figures = await self._conn.run(read)
        except StoreDown:
            return
        with self._lock:
            self._known.update(figures)

    def mean_s(self, endpoint: str) -> float | None:
        m = self._known.get(endpoint)
        return None if m is None or m[0] == 0 else m[2]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {ep: {"calls": c, "failures": f, "mean_latency_ms": round(m * 1000, 3)}
                    for ep, (c, f, m) in sorted(self._known.items())}


class RedisCounters:
    """Named counters (hashes of integers) and flags (strings) every worker shares; in this
    process's memory (:class:`LocalCounters`) while Redis is down, starting from the last
    values Redis gave (a drift alarm raised before an outage stays raised through it)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._prefix = conn.cfg.key_prefix
        self.local = LocalCounters()

    async def aincr(self, name: str, fields: Mapping[str, int]) -> dict[str, int]:
        key = f"{self._prefix}:counter:{name}"

        async def incr(c: Any) -> dict[str, int]:
            pipe = c.pipeline(transaction=True)  # MULTI: every field moves together
            for k, by in fields.items():
                pipe.hincrby(key, k, int(by))
            pipe.hgetall(key)
            *_, values = await pipe.execute()
            return {k: int(v) for k, v in values.items()}

        try:
            values = await self._conn.run(incr)
        except StoreDown:
            return await self.local.aincr(name, fields)
        self.local.remember_counts(name, values)
        return values

    async def aget(self, name: str) -> dict[str, int]:
        try:
            raw = await self._conn.run(lambda c: c.hgetall(f"{self._prefix}:counter:{name}"))
        except StoreDown:
            return await self.local.aget(name)
        values = {str(k): int(v) for k, v in raw.items()}
        self.local.remember_counts(name, values)
        return values

    async def aset_flag(self, name: str, value: str | None) -> None:
        key = f"{self._prefix}:flag:{name}"
        try:
            if value is None:
                await self._conn.run(lambda c: c.delete(key))
            else:
                await self._conn.run(lambda c: c.set(key, value))
        except StoreDown:
            pass
        await self.local.aset_flag(name, value)

    async def aget_flag(self, name: str) -> str | None:
        try:
            raw = await self._conn.run(lambda c: c.get(f"{self._prefix}:flag:{name}"))
        except StoreDown:
            return await self.local.aget_flag(name)
        value = None if raw is None else str(raw)
        self.local.remember_flag(name, value)
        return value

    async def aswap_flag(self, name: str, expected: str | None, value: str | None) -> bool:
        script = self._conn.script("flag_swap", lua.FLAG_SWAP)
        args = ["0" if expected is None else "1", expected or "",
                "0" if value is None else "1", value or ""]
        try:
            ok = bool(int(await self._conn.run(lambda c: script(
                keys=[f"{self._prefix}:flag:{name}"], args=args, client=c))))
        except StoreDown:
            return await self.local.aswap_flag(name, expected, value)
        if ok:
            self.local.remember_flag(name, value)
        return ok


class RedisStore:
    """Everything a Cascade shares between requests, shared by every worker through Redis."""

    shared = True

    def __init__(self, store: StoreConfig, config: CascadeConfig, *,
                 password: str | None = None, cache_secret: str | None = None) -> None:
        self.config = store
        self.conn = Connection(store, password=password)
        secret = None if cache_secret is None else cache_secret.encode()
        self.cache: RedisCache | None = (
            RedisCache(self.conn, ttl_s=config.cache.ttl_s, secret=secret)
            if config.cache.enabled else None)
        self.budgets = RedisBudgets(self.conn)
        self.breakers = RedisBreakers(self.conn, config.breaker)
        self.latency = RedisLatency(self.conn)
        self.counters = RedisCounters(self.conn)

    @classmethod
    def from_config(cls, config: CascadeConfig) -> RedisStore:
        """Validate ``config.store`` (errors name ``store.<key>`` and the file) and read the
        secrets it names from the environment. Connects lazily, on first use."""
        store = parse_store(config.store, source=config.source)
        if config.timeout_s is not None and store.reservation_ttl_s < config.timeout_s:
            raise ConfigError(
                f"must be at least the request timeout_s ({config.timeout_s:g}), or a slow "
                f"request's reservation would expire while it runs, got "
                f"{store.reservation_ttl_s:g}", source=config.source,
                key="store.reservation_ttl_s")
        return cls(store, config, password=secret_from_env(store, "password_env"),
                   cache_secret=secret_from_env(store, "cache_secret_env"))

    async def aping(self) -> bool:
        """Whether Redis answers now (for health checks)."""
        try:
            return bool(await self.conn.run(lambda c: c.ping()))
        except StoreDown:
            return False

    def status(self) -> dict[str, Any]:
        """Whether the last Redis call worked, and the spend waiting for it (in this process
        and its journal): a number that should be 0, and alarm if it grows."""
        return {"shared": True, "url": self.config.display_url, "reachable": not self.conn.down,
                "unsettled": self.budgets.unsettled}

    async def asettle_kept(self) -> None:
        await self.budgets.replay()  # returns at once when nothing is kept or due

    async def aclose(self) -> None:
        """Record any settles kept during an outage, then give back the connection pool."""
        await self.budgets.aclose()
        await self.conn.aclose()


def _satisfies_the_protocol(store: RedisStore) -> Store:
    """Never called: mypy checks here that RedisStore is a :class:`Store`."""
    return store

"""The Redis store against a real redis-server on loopback: config, cache, budgets, breakers,
latency, counters, and what happens while Redis is down. Each "worker" here is its own
RedisStore (its own pool); tests/test_store_workers.py uses separate processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from cascade.cache import cache_key
from cascade.config import CascadeConfig, parse_config
from cascade.errors import (
    BudgetExceeded,
    BudgetStoreError,
    CacheError,
    CircuitOpen,
    ConfigError,
    ServerError,
)
from cascade.store.redis import RedisStore
from cascade.trace import Answer, Attempt, Verdict
from tests.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.anyio
EP = "openai|http://127.0.0.1:9|m"

FREE_RUNG = {"model": "m", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server




def _config(url: str, cooldown_s: float = 0.3, **store: Any) -> CascadeConfig:
    return parse_config({
        "rungs": [{"model": "m", "provider": "openai-compatible", "base_url": "http://x/v1",
                    "price": "unknown"}],
        "breaker": {"failure_threshold": 2, "cooldown_s": cooldown_s},
        "store": {"url": url, "timeout_s": 2.0, **store},
    }, source="cascade.toml")


@pytest.fixture
async def workers(redis: RedisServer) -> AsyncIterator[list[RedisStore]]:
    stores = [RedisStore.from_config(_config(redis.url)) for _ in range(3)]
    yield stores
    for s in stores:
        await s.aclose()


def _answer(text: str = "Canberra", verified: bool = True) -> Answer:
    a = Attempt(rung=0, model="m", provider="openai", status="accepted", text=text,
                verdicts=[Verdict(passed=True, reason="ok", verifier="refusal")],
                input_tokens=5, output_tokens=1, cost_usd=1e-6)
    return Answer(text=text, model="m", verified=verified, attempts=[a], cost_usd=1e-6)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("store", "key", "match"), [
    ({}, "store.url", "required"),
    ({"url": "http://127.0.0.1:6379/0"}, "store.url", "redis://"),
    ({"url": "redis://:hunter2@127.0.0.1:6379/0"}, "store.url", "password_env"),
    ({"url": "redis://127.0.0.1:6379/x"}, "store.url", "database"),
    ({"url": "redis://127.0.0.1:6379/0", "password": "hunter2"}, "store.password",
     "password_env"),
    ({"url": "redis://127.0.0.1:6379/0", "budgets_on_outage": "ignore"},
     "store.budgets_on_outage", "fail-closed, fail-open"),
    ({"url": "redis://127.0.0.1:6379/0", "timeout_s": 0}, "store.timeout_s", "> 0"),
    ({"url": "redis://127.0.0.1:6379/0", "password_env": "CASCADE_TEST_UNSET_PW"},
     "store.password_env", "not set"),
])
def test_store_config_errors_name_the_key_and_file(store: dict[str, Any], key: str,
                                                   match: str) -> None:
    cfg = parse_config({"rungs": [FREE_RUNG], "store": store}, source="cascade.toml")
    with pytest.raises(ConfigError, match=match) as info:
        RedisStore.from_config(cfg)
    assert info.value.key == key and info.value.source == "cascade.toml"
    assert "hunter2" not in str(info.value)


def test_a_password_with_control_characters_is_refused_unechoed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_TEST_PW", "pass\x1b[2Jword")
    cfg = parse_config({"rungs": [FREE_RUNG], "store": {
        "url": "rediss://127.0.0.1:6380/1", "password_env": "CASCADE_TEST_PW"}})
    with pytest.raises(ConfigError, match="control characters") as info:
        RedisStore.from_config(cfg)
    assert "pass" not in str(info.value).replace("password", "")


def test_reservations_must_outlive_a_request() -> None:
    cfg = parse_config({"rungs": [FREE_RUNG], "timeout_s": 120,
                        "store": {"url": "redis://127.0.0.1:1/0", "reservation_ttl_s": 60}})
    with pytest.raises(ConfigError, match=r"store\.reservation_ttl_s"):
        RedisStore.from_config(cfg)


async def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_TEST_PW", "s3cret-pw\n")  # as `export X=$(cat file)` leaves it
    with redis_server(password="s3cret-pw") as server:
        good = RedisStore.from_config(_config(server.url, password_env="CASCADE_TEST_PW"))
        bad = RedisStore.from_config(_config(server.url))
        try:
            assert await good.aping()
            assert not await bad.aping()  # NOAUTH: a store error, not a crash
        finally:
            await good.aclose()
            await bad.aclose()


# ---------------------------------------------------------------- cache


async def test_an_answer_cached_by_one_worker_is_a_hit_for_another(
        workers: list[RedisStore], redis: RedisServer) -> None:
    a, b, _ = workers
    assert a.cache is not None and b.cache is not None
    k = cache_key({"q": "capital of Australia"})
    assert await b.cache.aget(k) is None
    await a.cache.aset(k, _answer())
    got = await b.cache.aget(k)
    assert got is not None and got.text == "Canberra" and got.verified
    assert got.attempts[0].verdicts[0].verifier == "refusal"
    with pytest.raises(ValueError, match="only verified"):
        await a.cache.aset(k, _answer(verified=False))
    # the disk cache's entry format: key, HMAC'd JSON body
    raw = json.loads(await a.conn.run(lambda c: c.get(f"cascade:cache:{k}")))
    assert raw["key"] == k and set(raw) == {"key", "mac", "answer"}


async def test_damaged_or_forged_shared_entries_are_dropped(workers: list[RedisStore]) -> None:
    a = workers[0]
    assert a.cache is not None
    k = cache_key({"q": 1})
    await a.cache.aset(k, _answer("right"))
    raw = json.loads(await a.conn.run(lambda c: c.get(f"cascade:cache:{k}")))
    raw["answer"] = raw["answer"].replace("right", "wrong")
    for value in (json.dumps(raw), "{not json", "x"):
        await a.conn.run(lambda c, v=value: c.set(f"cascade:cache:{k}", v))
        assert await a.cache.aget(k) is None
        assert await a.conn.run(lambda c: c.exists(f"cascade:cache:{k}")) == 0


async def test_cache_ttl_is_the_disk_caches(redis: RedisServer) -> None:
    cfg = _config(redis.url).replace(cache=parse_config(
        {"rungs": [FREE_RUNG], "cache": {"ttl_s": 60}}).cache)
    store = RedisStore.from_config(cfg)
    try:
        assert store.cache is not None
        k = cache_key({"q": 2})
        await store.cache.aset(k, _answer())
        ttl_ms = await store.conn.run(lambda c: c.pttl(f"cascade:cache:{k}"))
        assert 55_000 < ttl_ms <= 60_000
    finally:
        await store.aclose()


# ---------------------------------------------------------------- budgets


async def test_concurrent_workers_never_reserve_past_the_limit(
        workers: list[RedisStore]) -> None:
    """3 workers × 40 concurrent requests of $0.03 on a $1.00 limit: exactly 33 fit."""
    granted: list[Any] = []
    refused: list[BudgetExceeded] = []

    async def one(store: RedisStore) -> None:
        try:
            res = await store.budgets.areserve("tenant", 0.03, 1.00, 3600)
        except BudgetExceeded as e:
            refused.append(e)
            return
        granted.append(res)
        await anyio.lowlevel.checkpoint()
        await store.budgets.asettle(res, 0.03)

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            for s in workers:
                tg.start_soon(one, s)
    assert len(granted) == 33 and len(refused) == 120 - 33
    assert await workers[1].budgets.aspent("tenant", 3600) == pytest.approx(0.99)
    assert await workers[2].budgets.apending("tenant", 3600) == 0.0
    e = refused[0]
    assert e.key == "tenant" and e.limit_usd == 1.0 and "tenant" in str(e)
    # settling or releasing twice changes nothing
    await workers[0].budgets.asettle(granted[0], 0.03)
    await workers[0].budgets.arelease(granted[1])
    assert await workers[0].budgets.aspent("tenant", 3600) == pytest.approx(0.99)


async def test_release_frees_and_settle_charges_the_actual(workers: list[RedisStore]) -> None:
    a, b, _ = workers
    r1 = await a.budgets.areserve("k", 0.6, 1.0, 3600)
    with pytest.raises(BudgetExceeded):
        await b.budgets.areserve("k", 0.6, 1.0, 3600)
    await a.budgets.arelease(r1)
    r2 = await b.budgets.areserve("k", 0.6, 1.0, 3600)
    await b.budgets.asettle(r2, 0.25)  # cheaper than estimated
    assert await a.budgets.aspent("k", 3600) == pytest.approx(0.25)
    r3 = await a.budgets.areserve("k", 0.7, 1.0, 3600)
    await a.budgets.asettle(r3, 2**64 * 15 / 1e6)  # an absurd claim: charged the estimate
    assert await a.budgets.aspent("k", 3600) == pytest.approx(0.95)


async def test_window_rollover_is_atomic_and_keeps_late_spend(
        workers: list[RedisStore]) -> None:
    a, b, _ = workers
    period = 0.5
    first = await a.budgets.areserve("roll", 1.0, 1.0, period)
    # wait for Redis's clock to enter the next window
    with anyio.fail_after(5):
        while True:
            try:
                second = await b.budgets.areserve("roll", 1.0, 1.0, period)
                break
            except BudgetExceeded:
                await anyio.sleep(0.05)
    assert second.window == first.window + 1
    await a.budgets.asettle(first, 0.4)  # settles into its own (old) window
    await b.budgets.asettle(second, 0.7)
    # the old window's settle never lands in the new one (1.1 or 0.4 would show that); 0.0
    # if Redis's clock has meanwhile moved on to a third window
    assert await a.budgets.aspent("roll", period) in (pytest.approx(0.7), 0.0)


async def test_a_crashed_workers_reservation_expires_and_late_spend_is_kept(
        redis: RedisServer) -> None:
    store = RedisStore.from_config(_config(redis.url, reservation_ttl_s=0.3))
    try:
        orphan = await store.budgets.areserve("crash", 1.0, 1.0, 3600)  # never settled...
        with pytest.raises(BudgetExceeded):
            await store.budgets.areserve("crash", 0.5, 1.0, 3600)
        await anyio.sleep(0.4)
        r = await store.budgets.areserve("crash", 0.5, 1.0, 3600)  # ...so it stops blocking
        await store.budgets.asettle(r, 0.5)
        await store.budgets.asettle(orphan, 0.2)  # ...but a late settle is still charged
        assert await store.budgets.aspent("crash", 3600) == pytest.approx(0.7)
        assert await store.budgets.apending("crash", 3600) == 0.0
    finally:
        await store.aclose()


# ---------------------------------------------------------------- breakers, latency, counters


async def test_a_circuit_opened_by_one_worker_is_open_for_all(redis: RedisServer) -> None:
    # A cool-down of a second: the probe's lease lasts as long, and all thirty checks below
    # must fall inside it even on a loaded machine (at 0.3 s one run in many saw two probes).
    workers = [RedisStore.from_config(_config(redis.url, cooldown_s=1.0)) for _ in range(3)]
    try:
        await _one_probe_cluster_wide(workers)
    finally:
        for w in workers:
            await w.aclose()


async def _one_probe_cluster_wide(workers: list[RedisStore]) -> None:
    a, b, c = workers
    fail = ServerError("down", provider="openai", model="m", status_code=503)
    assert await b.breakers.acheck(EP) is False
    await a.breakers.arecord(EP, fail)
    await a.breakers.arecord(EP, fail)
    for w in (b, c):
        with pytest.raises(CircuitOpen, match="shared by every worker"):
            await w.breakers.acheck(EP)
    snap = await c.breakers.asnapshot()
    assert snap[EP]["state"] == "open" and snap[EP]["consecutive_failures"] == 2
    await anyio.sleep(1.05)  # the cool-down
    probes: list[bool] = []
    blocked: list[CircuitOpen] = []

    async def check(w: RedisStore) -> None:
        try:
            probes.append(await w.breakers.acheck(EP))
        except CircuitOpen as e:
            blocked.append(e)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            for w in workers:
                tg.start_soon(check, w)
    assert probes == [True] and len(blocked) == 29  # exactly one probe, cluster-wide
    await c.breakers.arecord(EP, None)  # the probe answered: closed for everyone
    assert await a.breakers.acheck(EP) is False and await b.breakers.acheck(EP) is False


async def test_latency_and_counters_are_shared(workers: list[RedisStore]) -> None:
    a, b, _ = workers
    await a.latency.aobserve(EP, 0.2)
    await a.latency.aobserve(EP, 0.4)
    assert a.latency.mean_s(EP) == pytest.approx(0.24)
    assert b.latency.mean_s(EP) is None  # not read yet: mean_s does no I/O
    await b.latency.arefresh()
    assert b.latency.mean_s(EP) == pytest.approx(0.24)
    await b.latency.aobserve(EP, 0.0, failed=True)
    assert b.latency.snapshot()[EP] == {"calls": 2, "failures": 1, "mean_latency_ms": 240.0}

    assert await a.counters.aincr("shadow:x", {"samples": 1, "disagreements": 0}) == {
        "samples": 1, "disagreements": 0}
    assert await b.counters.aincr("shadow:x", {"samples": 2, "disagreements": 1}) == {
        "samples": 3, "disagreements": 1}
    assert await a.counters.aget("shadow:x") == {"samples": 3, "disagreements": 1}
    await a.counters.aset_flag("drift:x", "alarm")
    assert await b.counters.aget_flag("drift:x") == "alarm"
    await b.counters.aset_flag("drift:x", None)
    assert await a.counters.aget_flag("drift:x") is None


# ---------------------------------------------------------------- outage


async def test_redis_down_then_back_without_a_restart(redis: RedisServer) -> None:
    """Killed: the cache is bypassed, breakers are per-process, budgets fail closed naming the
    store, and a settle that could not be recorded is kept; restarted: all of it works again
    with the same objects, and the kept spend is recorded."""
    store = RedisStore.from_config(_config(redis.url))
    try:
        assert store.cache is not None
        k = cache_key({"q": 3})
        res = await store.budgets.areserve("t", 0.1, 1.0, 3600)
        redis.kill()
        with pytest.raises(CacheError, match="unreachable"):
            await store.cache.aget(k)
        with pytest.raises(CacheError, match=redis.url.replace("/0", "")):
            await store.cache.aset(k, _answer())
        with pytest.raises(BudgetStoreError, match=rf"{redis.port}.*fail-closed") as info:
            await store.budgets.areserve("t", 0.1, 1.0, 3600)
        assert "'t'" in str(info.value)
        await store.budgets.asettle(res, 0.1)  # kept in the process
        # the settle only: the refused reserve failed fast, never reaching Redis, so there is
        # nothing of it to release
        assert store.budgets.unsettled == 1
        fail = ServerError("down", provider="openai", model="m", status_code=503)
        assert await store.breakers.acheck(EP) is False
        await store.breakers.arecord(EP, fail)
        await store.breakers.arecord(EP, fail)
        with pytest.raises(CircuitOpen):  # the process's own breaker took over
            await store.breakers.acheck(EP)
        await store.latency.aobserve(EP, 0.5)
        assert store.latency.mean_s(EP) == pytest.approx(0.5)
        assert await store.counters.aincr("c", {"n": 1}) == {"n": 1}

        redis.start()  # an empty Redis (no persistence in the tests)
        await anyio.sleep(1.1)  # past the connection's fail-fast second
        r = await store.budgets.areserve("t", 0.1, 1.0, 3600)
        assert store.budgets.unsettled == 0
        assert await store.budgets.aspent("t", 3600) == pytest.approx(0.1)
        await store.budgets.asettle(r, 0.1)
        await store.cache.aset(k, _answer())
        assert await store.cache.aget(k) is not None
        assert await store.breakers.acheck(EP) is False  # shared state again (fresh Redis)
    finally:
        await store.aclose()


async def test_a_hung_redis_never_holds_a_call_past_the_timeout(redis: RedisServer) -> None:
    """SIGSTOP: connections are accepted but never answered. Every call gives up within
    [store] timeout_s (0.3 s here) instead of hanging."""
    store = RedisStore.from_config(_config(redis.url, timeout_s=0.3))
    try:
        assert store.cache is not None
        assert await store.aping()
        redis.pause()
        with anyio.fail_after(5):  # a hang would fail here, far beyond the store's timeout
            with pytest.raises(CacheError):
                await store.cache.aget(cache_key({"q": 4}))
            with pytest.raises(BudgetStoreError, match="unreachable"):
                await store.budgets.areserve("t", 0.1, 1.0, 3600)
            assert await store.breakers.acheck(EP) is False
        redis.resume()
        await anyio.sleep(1.1)
        assert await store.aping()
    finally:
        redis.resume()
        await store.aclose()


async def test_fail_open_lets_calls_through_and_records_them_later(
        redis: RedisServer) -> None:
    store = RedisStore.from_config(_config(redis.url, budgets_on_outage="fail-open"))
    try:
        assert await store.aping()
        redis.kill()
        res = await store.budgets.areserve("t", 0.2, 1.0, 3600)  # let through, unmetered
        await store.budgets.asettle(res, 0.15)
        assert store.budgets.unsettled == 2
        redis.start()
        await anyio.sleep(1.1)
        assert await store.budgets.aspent("t", 3600) == pytest.approx(0.15)
    finally:
        await store.aclose()


def test_the_readme_store_example_is_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The [store] example of "Running many workers" loads as written."""
    import re
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Running many workers"):]
    block = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    table = tomllib.loads(block.group(1))
    monkeypatch.setenv("REDIS_PASSWORD", "pw")
    store = RedisStore.from_config(parse_config({"rungs": [FREE_RUNG], **table}))
    assert store.config.url == "redis://10.0.0.5:6379/0"
    assert store.config.budgets_on_outage == "fail-closed"


async def _spent_seen_elsewhere(url: str, key: str) -> float:
    """What another worker's store reads as spent on ``key`` (this hour)."""
    other = RedisStore.from_config(_config(url))
    try:
        return await other.budgets.aspent(key, 3600)
    finally:
        await other.aclose()


async def test_kept_spend_is_recorded_without_a_request_once_redis_answers(
        redis: RedisServer) -> None:
    """A settle kept in the process during an outage was recorded only at its next budgeted
    request: a worker its clients were not pinned to held it for minutes after Redis came
    back, the key's spend under-counted meanwhile (another worker spent past the limit) and
    ``unsettled`` never cleared. ``asettle_kept`` (health checks, and ``cascade serve`` every
    few seconds) records it."""
    store = RedisStore.from_config(_config(redis.url))
    try:
        res = await store.budgets.areserve("t", 0.1, 1.0, 3600)
        redis.kill()
        await store.budgets.asettle(res, 0.1)
        assert store.budgets.unsettled == 1
        await store.asettle_kept()  # Redis still down: kept, no error
        assert store.budgets.unsettled == 1
        redis.start()
        await anyio.sleep(1.1)  # past the connection's fail-fast second
        await store.asettle_kept()
        assert store.budgets.unsettled == 0
        assert await _spent_seen_elsewhere(redis.url, "t") == pytest.approx(0.1)
    finally:
        await store.aclose()


async def test_an_idle_store_takes_up_the_journal_a_closed_one_left(
        redis: RedisServer, tmp_path: Any) -> None:
    """Spend a store kept during an outage goes to its journal when it closes (a config a
    reload retired, a worker that died); an idle store's ``asettle_kept`` looked only at its
    own kept settles, so nobody recorded that spend until a budgeted request came."""
    cfg = _config(redis.url, journal_dir=str(tmp_path / "journal"))
    old = RedisStore.from_config(cfg)
    res = await old.budgets.areserve("k", 0.1, 1.0, 3600)
    redis.kill()
    await old.budgets.asettle(res, 0.1)
    await old.aclose()  # retired during the outage: its kept settle is in the journal
    live = RedisStore.from_config(cfg)
    try:
        redis.start()
        await anyio.sleep(1.1)
        await live.asettle_kept()
        assert await _spent_seen_elsewhere(redis.url, "k") == pytest.approx(0.1)
    finally:
        await live.aclose()

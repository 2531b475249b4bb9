"""The shared Redis store against the local stores, measured in the same run.

    python bench/store.py [--n 2000] [--workers 1 2 4] [--seconds 3] [--concurrency 16]

Starts a ``redis-server`` on a free loopback port (no persistence), then, one operation at a
time: a verified-cache hit (``aget`` of a stored answer: disk cache in a worker thread vs
Redis ``GET`` + HMAC check), a budget reserve + settle (in-memory store, SQLite store, the Redis
Lua scripts) and a breaker check. Then the throughput of N worker processes sharing that one
Redis, each running ``--concurrency`` loops of (cache hit, reserve, settle, breaker check) on
one shared budget key for ``--seconds``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
from _common import machine, print_table, stats

from cascade.budget import InMemoryBudgetStore, SQLiteBudgetStore
from cascade.cache import AnswerCache, cache_key
from cascade.config import CascadeConfig, parse_config
from cascade.store.local import LocalBreakers, LocalBudgets, LocalCache
from cascade.store.redis import RedisStore
from cascade.trace import Answer, Attempt, Verdict
from tests.redis_server import RedisServer

EP = "openai|http://127.0.0.1:9|m"
KEY = cache_key({"bench": "store"})


def _answer() -> Answer:
    a = Attempt(rung=0, model="m", provider="openai", status="accepted",
                text="Canberra is the capital of Australia.",
                verdicts=[Verdict(passed=True, reason="ok", verifier="refusal")],
                input_tokens=12, output_tokens=8, cost_usd=2e-6)
    return Answer(text=a.text or "", model="m", verified=True, attempts=[a], cost_usd=2e-6)


def _config(url: str) -> CascadeConfig:
    return parse_config({"rungs": [{"model": "m"}], "store": {"url": url, "timeout_s": 5.0}})


async def _time(n: int, op: Callable[[], Awaitable[Any]]) -> list[float]:
    for _ in range(min(50, n)):  # warm: connections, scripts loaded, caches filled
        await op()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await op()
        out.append(time.perf_counter() - t)
    return out


def _reserve_settle(budgets: Any) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        r = await budgets.areserve("bench", 1e-6, 1e9, 3600)
        await budgets.asettle(r, 1e-6)
    return op


async def latencies(url: str, n: int, tmp: str) -> list[tuple[str, str, Any]]:
    disk = LocalCache(AnswerCache(Path(tmp) / "cache"), owned=True)
    await disk.aset(KEY, _answer())
    store = RedisStore.from_config(_config(url))
    assert store.cache is not None
    await store.cache.aset(KEY, _answer())
    redis_cache = store.cache
    rows = [
        ("cache hit", "local: diskcache in a worker thread",
         stats(await _time(n, lambda: disk.aget(KEY)))),
        ("cache hit", "redis: GET + HMAC check", stats(await _time(n, lambda: redis_cache.aget(
            KEY)))),
        ("reserve + settle", "local: in memory",
         stats(await _time(n, _reserve_settle(LocalBudgets(InMemoryBudgetStore()))))),
        ("reserve + settle", "local: SQLite (WAL) in a worker thread",
         stats(await _time(n, _reserve_settle(LocalBudgets(SQLiteBudgetStore(
             Path(tmp) / "budget.sqlite3")))))),
        ("reserve + settle", "redis: two Lua scripts",
         stats(await _time(n, _reserve_settle(store.budgets)))),
        ("breaker check", "local: process breakers",
         stats(await _time(n, lambda: LocalBreakers(store.breakers.local).acheck(EP)))),
        ("breaker check", "redis: one Lua script",
         stats(await _time(n, lambda: store.breakers.acheck(EP)))),
    ]
    await store.aclose()
    await disk.aclose()
    return rows


def _worker(url: str, seconds: float, concurrency: int, start_at: float) -> int:
    """One process: ``concurrency`` loops of (hit, reserve, settle, check) until the end."""
    async def main() -> int:
        store = RedisStore.from_config(_config(url))
        assert store.cache is not None
        cache = store.cache
        await cache.aget(KEY)
        done = 0
        await anyio.sleep(max(0.0, start_at - time.time()))
        end = time.time() + seconds

        async def loop() -> None:
            nonlocal done
            while time.time() < end:
                assert await cache.aget(KEY) is not None
                r = await store.budgets.areserve("shared", 1e-6, 1e9, 3600)
                await store.budgets.asettle(r, 1e-6)
                await store.breakers.acheck(EP)
                done += 1

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(loop)
        await store.aclose()
        return done

    return anyio.run(main)


def throughput(url: str, workers: int, seconds: float, concurrency: int) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        start_at = time.time() + 3.0  # every process imported and connected by then
        counts = pool.starmap(_worker, [(url, seconds, concurrency, start_at)] * workers)
    return sum(counts) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="operations timed per row")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                   help="worker process counts for the throughput part")
    p.add_argument("--seconds", type=float, default=3.0, help="throughput run per count")
    p.add_argument("--concurrency", type=int, default=16, help="loops in flight per worker")
    args = p.parse_args()
    server = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = anyio.run(latencies, server.url, args.n, tmp)
        print(f"# store latency, one operation at a time ({machine()})")
        print_table(["operation", "store", "n", "p50 ms", "p99 ms", "mean ms"],
                    [(op, where, s.n, s.p50, s.p99, s.mean) for op, where, s in rows])
        print()
        print(f"# N workers sharing one Redis: (hit, reserve, settle, check) loops, "
              f"{args.concurrency} in flight per worker, {args.seconds:g}s each")
        out = []
        for n in args.workers:
            rate = throughput(server.url, n, args.seconds, args.concurrency)
            out.append((n, rate, rate * 4))  # GET, reserve, settle, check
        print_table(["workers", "loops/s", "redis calls/s"], out)
    finally:
        server.stop()


if __name__ == "__main__":
    main()

"""How fast a verified-cache hit is served, against a raw ``diskcache`` read of the same entry.

    python bench/cache_hit.py [--n 5000] [--concurrency 32]

One answer is stored through the engine (a loopback rung, refusal verifier), then read back
``n`` times each way: the raw ``diskcache.Cache.get`` of the entry (the floor), the same read
hopped to a worker thread as the engine does, ``AnswerCache.get`` (checksum, key check, JSON
to ``Answer``), and ``Cascade.aanswer()`` end to end (request normalising, cache key, lookup).
Hits per second are shown sequentially and with ``--concurrency`` requests in flight.
Target: under 1 ms p50 for a hit through ``aanswer``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import anyio.to_thread
import diskcache
from _common import (
    PROMPT,
    Stats,
    ladder,
    machine,
    make_cascade,
    model_server,
    print_table,
    stats,
)

TARGET_P50_MS = 1.0


async def _timed(fn: Callable[[], Awaitable[object]], n: int, warmup: int) -> Stats:
    for _ in range(warmup):
        await fn()
    out: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return stats(out)


async def _rate(fn: Callable[[], Awaitable[object]], n: int, concurrency: int) -> float:
    """Completed calls per second with ``concurrency`` workers sharing ``n`` calls."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await fn()

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return n / (time.perf_counter() - t)


async def run(base_url: str, cache_dir: str, n: int, concurrency: int
              ) -> list[tuple[str, Stats, float]]:
    cascade, _how = make_cascade(ladder(base_url, cache_dir=cache_dir))
    try:
        first = await cascade.aanswer(PROMPT)
        assert first.verified and not first.cache_hit and first.cache_key
        key = first.cache_key
        hit = await cascade.aanswer(PROMPT)
        assert hit.cache_hit, "the second request was not served from the cache"
        raw_db = diskcache.Cache(cache_dir, disk=diskcache.JSONDisk)
        store = cascade.cache

        async def raw_get() -> object:
            v = raw_db.get(key)
            assert v is not None
            return v

        async def raw_get_thread() -> object:
            return await anyio.to_thread.run_sync(raw_db.get, key)

        async def store_get() -> object:
            a = store.get(key)
            assert a is not None
            return a

        async def aanswer_hit() -> object:
            a = await cascade.aanswer(PROMPT)
            assert a.cache_hit
            return a

        rows: list[tuple[str, Stats, float]] = []
        for name, fn in (("diskcache.Cache.get (raw)", raw_get),
                         ("  same, in a worker thread", raw_get_thread),
                         ("AnswerCache.get", store_get),
                         ("Cascade.aanswer (hit)", aanswer_hit)):
            s = await _timed(fn, n, warmup=min(200, n))
            rate = await _rate(fn, n, concurrency)
            rows.append((name, s, rate))
        raw_db.close()
        return rows
    finally:
        await cascade.aclose()
        cascade.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=32)
    ns = ap.parse_args(argv)
    with model_server(mode="thread") as url, tempfile.TemporaryDirectory() as d:
        rows = anyio.run(run, url, d, ns.n, ns.concurrency)
    raw = rows[0][1]
    print(f"verified-cache hit, n={ns.n} sequential reads each; milliseconds; hits/s "
          f"sequential (1/mean) and with {ns.concurrency} in flight")
    print(f"({machine()})")
    print_table(("read", "p50", "p99", "× raw p50", "hits/s seq", f"hits/s c={ns.concurrency}"),
                [(name, s.p50, s.p99, f"{s.p50 / raw.p50:.1f}", f"{1000 / s.mean:,.0f}",
                  f"{rate:,.0f}") for name, s, rate in rows])
    hit = rows[-1][1]
    print(f"target: < {TARGET_P50_MS:g} ms p50 through aanswer: "
          f"{'met' if hit.p50 < TARGET_P50_MS else 'NOT met'} ({hit.p50:.3f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
